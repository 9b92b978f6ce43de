"""An exclusive lock on a run folder while a chunk trains.

An advisory `flock` on `RUN_DIR/.lock`: the kernel releases it when the holder exits, crashes or is killed,
so a stale lock never blocks the next chunk. It needs a filesystem with working flock (local disks do; some
network filesystems only lock per host).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunLockedError(RuntimeError):
    """Another trainer holds the run folder."""


class RunLock:
    """`with RunLock(run_dir): ...` holds the folder or raises RunLockedError at once."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.run_dir} is in use by another trainer ({holder}); "
                f"wait for it to finish or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
