"""A training run's folder, and the one owner of its layout:

    RUN_DIR/checkpoint-<step>.pt (+ .sha256)   storage.checkpoints.CheckpointStore
    RUN_DIR/history.jsonl                      one JSON record per chunk, appended
    RUN_DIR/state.json                         the latest convergence decision, replaced atomically
    RUN_DIR/chain.json                         the chain's id, written once when the folder is first used
    RUN_DIR/.lock                              held while a chunk trains (storage.runlock.RunLock)
    RUN_DIR/attention/                         attention pictures
    RUN_DIR/wandb/                             wandb's offline files

Nothing outside storage/ writes into a run folder except through this class.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from storage.checkpoints import CheckpointStore
from storage.runlock import RunLock
from storage.staging import write_atomic

log = logging.getLogger(__name__)


class RunFolder:
    """The files of one training run."""

    HISTORY = "history.jsonl"
    STATE = "state.json"
    CHAIN = "chain.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def history_path(self) -> Path:
        return self.path / self.HISTORY

    @property
    def state_path(self) -> Path:
        return self.path / self.STATE

    @property
    def chain_path(self) -> Path:
        return self.path / self.CHAIN

    @property
    def attention_dir(self) -> Path:
        return self.path / "attention"

    def lock(self) -> RunLock:
        """`with folder.lock(): ...` holds the folder while a chunk trains, or raises RunLockedError."""
        return RunLock(self.path)

    def checkpoints(self, keep: int = 3) -> CheckpointStore:
        return CheckpointStore(self.path, keep=keep)

    def read_history(self) -> list[dict[str, Any]]:
        """The chunk records; a line torn by a kill during its append is skipped with a warning."""
        if not self.history_path.exists():
            return []
        records = []
        for number, line in enumerate(self.history_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not a complete record (a write cut short?); skipped",
                            self.history_path, number)
        return records

    def append_history(self, record: dict[str, Any]) -> None:
        """Append one record and fsync it; a line left without its newline by an earlier kill is ended first."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def write_state(self, state: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps(state, indent=2))

    def chain_id(self) -> str:
        """The id of the chain of chunks that trains in this folder: made the first time it is asked for (a folder
        made by an older version gets one then) and kept in chain.json. A folder deleted and made again under the
        same path is a new chain with a new id, so keys built from it (the chunks' idempotency keys) never
        collide with the old chain's."""
        if not self.chain_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.chain_path, json.dumps({"chain_id": uuid.uuid4().hex}))
        return str(json.loads(self.chain_path.read_text())["chain_id"])

    @staticmethod
    def picture_prefix(chunk: int) -> str:
        """The start of the names of a chunk's pictures: chunk-007-<video id>.png."""
        return f"chunk-{chunk:03d}"

    def pictures(self, chunk: int) -> list[Path]:
        """The attention pictures of one chunk, by name."""
        return sorted(self.attention_dir.glob(f"{self.picture_prefix(chunk)}-*.png"))

    def attention_folder(self) -> Path:
        """The folder of the attention pictures, created when asked for."""
        self.attention_dir.mkdir(parents=True, exist_ok=True)
        return self.attention_dir
