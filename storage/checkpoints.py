"""Checkpoints of a run folder behind a small protocol: save, latest, load, load_latest, prune.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed into place, so a
crash during a save leaves the previous checkpoints intact and never a truncated "latest". The latest is found
by listing the folder, not by a name that a half-finished write could have clobbered.

Each checkpoint has a `.sha256` file beside it (`sha256sum -c` reads it), written before the checkpoint is
renamed into place: torch.load notices a truncated file but loads a file with flipped bytes without a word, so
the digest is what catches a disk or a copy that damaged one. `load_latest` then falls back to the previous
checkpoint with a warning and moves the damaged one aside (`.corrupt`), so it is kept for a look but never
picked again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from storage.staging import atomic_file, write_atomic

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
        """Write atomically (temporary file, fsync, digest, rename), then prune old checkpoints."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        # Serialised in memory first: torch.save reports a failed write as an opaque RuntimeError ("enforce fail
        # ... unexpected pos"), a plain file write as the OSError it is (disk full, read-only).
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
        try:
            with atomic_file(final) as f:  # renamed into place after the digest: no checkpoint without its digest
                f.write(data)
                write_atomic(digest_path(final), f"{hashlib.sha256(data).hexdigest()}  {final.name}\n")
        except OSError as err:  # disk full, file-size limit, read-only: the older checkpoints are intact
            latest = self.latest()
            raise CheckpointError(
                f"could not write checkpoint {final.name} in {self.run_dir}: {err.strerror or err}; free disk "
                f"space or check that the folder is writable, then run again: it resumes from "
                f"{latest.name if latest else 'the start'}"
            ) from err
        finally:
            del data
        _fsync_dir(self.run_dir)
        self.prune()
        log.info("saved checkpoint %s", final)
        return final

    def load(self, path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Load a checkpoint (the latest when no path is given) with weights_only=True: data, never code.

        The file is checked against its `.sha256` first when it has one (checkpoints of older versions do not).
        """
        target = Path(path) if path is not None else self.latest()
        if target is None:
            raise CheckpointError(f"no checkpoint in {self.run_dir} (start without --resume, or check --run-dir)")
        if not target.is_file():
            raise CheckpointError(f"checkpoint {target} does not exist (check --resume)")
        expected = _read_digest(target)
        if expected is not None and file_sha256(target) != expected:
            raise CheckpointError(f"checkpoint {target} is corrupt: its bytes do not match {digest_path(target).name}")
        try:
            state = torch.load(target, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
            raise CheckpointError(f"cannot read checkpoint {target}: {describe_load_error(err)}") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {target} holds a {type(state).__name__}, not a checkpoint's dict")
        return state

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, or None when the folder has none.

        A damaged one (truncated, flipped bytes, unreadable) is logged as a warning and renamed to `.corrupt`,
        and the one before it is tried. When every checkpoint is damaged this raises instead of starting over,
        which would silently throw the run away.
        """
        damaged: list[str] = []
        for step in reversed(self.steps()):
            path = self.path_for(step)
            try:
                state = self.load(path, map_location)
            except CheckpointError as err:
                log.warning("%s; resuming from the checkpoint before it", err)
                damaged.append(path.name)
                _set_aside(path)
                continue
            if damaged:
                log.warning("resumed from %s after skipping damaged %s", path.name, ", ".join(damaged))
            return state, path
        if damaged:
            raise CheckpointError(
                f"every checkpoint in {self.run_dir} is damaged ({', '.join(damaged)}, now renamed *.corrupt): "
                f"restore one from a backup, or start over in a new --run-dir"
            )
        return None

    def prune(self) -> None:
        for step in self.steps()[:-self.keep]:
            self.path_for(step).unlink(missing_ok=True)
            digest_path(self.path_for(step)).unlink(missing_ok=True)
        for digest in self.run_dir.glob("checkpoint-*.pt.sha256"):  # its checkpoint was never renamed in
            if not digest.with_suffix("").exists():
                digest.unlink(missing_ok=True)
        for stale in self.run_dir.glob(".checkpoint-*.tmp"):  # left by a crash during a save
            if _older_than(stale, seconds=3600):
                stale.unlink(missing_ok=True)


def describe_load_error(err: BaseException) -> str:
    """torch.load's reason in one line. A weights-only refusal is a long text whose point is one line (which
    global the file wanted to import); that line is what goes into logs and failure reasons."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        lines = [line.strip() for line in text.splitlines() if "global" in line.lower()]
        point = lines[0].rstrip(".") if lines else text.splitlines()[0]
        return f"refused by weights-only loading, the file holds more than tensors and plain data ({point})"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def digest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _read_digest(checkpoint: Path) -> str | None:
    try:
        text = digest_path(checkpoint).read_text().split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text[0] if text else None


def _set_aside(path: Path) -> None:
    """Rename a damaged checkpoint (and its digest) so that `steps` no longer lists it."""
    try:
        os.replace(path, path.with_name(path.name + ".corrupt"))
        digest = digest_path(path)
        if digest.exists():
            os.replace(digest, digest.with_name(digest.name + ".corrupt"))
    except OSError as err:
        log.warning("could not rename damaged checkpoint %s aside: %s", path, err)


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
