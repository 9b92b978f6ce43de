"""Checkpoints of a run folder behind a small protocol: save, latest, load, prune.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed into place, so a
crash during a save leaves the previous checkpoints intact and never a truncated "latest". The latest is found
by listing the folder, not by a name that a half-finished write could have clobbered.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message says which setting to change."""


class CheckpointStore:
    """The checkpoints of one run folder: `checkpoint-<step>.pt`, newest kept `keep` at a time."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.run_dir = Path(run_dir)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.run_dir / f"checkpoint-{step:09d}.pt"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.run_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write atomically (temporary file, fsync, rename), then prune old checkpoints."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=self.run_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.run_dir)
        self.prune()
        log.info("saved checkpoint %s", final)
        return final

    def load(self, path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Load a checkpoint (the latest when no path is given) with weights_only=True: data, never code."""
        target = Path(path) if path is not None else self.latest()
        if target is None:
            raise CheckpointError(f"no checkpoint in {self.run_dir} (start without --resume, or check --run-dir)")
        if not target.is_file():
            raise CheckpointError(f"checkpoint {target} does not exist (check --resume)")
        try:
            return torch.load(target, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"cannot read checkpoint {target}: {err}") from err

    def prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            self.path_for(step).unlink(missing_ok=True)
        for stale in self.run_dir.glob(".checkpoint-*.tmp"):  # left by a crash during a save
            if _older_than(stale, seconds=3600):
                stale.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    import time

    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
