"""Build a folder under a temporary name beside its final place, then rename it into place.

A process killed while building leaves only its `.NAME.creating-HOST-PID-*` folder, never a half-made NAME; the
next builder on the same host removes the folders of builders whose process is gone. Also the one helper that
writes a small file atomically (temporary file, fsync, rename; the temporary file removed on error).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

log = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` in one step: a reader sees the old file or the new one, never half of one."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into: fsynced and renamed over `path` when the block ends,
    removed (and `path` left as it was) when the block raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staging_prefix(final: Path) -> str:
    """Name prefix of the folders `final` is built in before it is renamed into place."""
    return f".{final.name}.creating-{socket.gethostname()}-"


@contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an absent path beside `final` to build it in; rename it to `final` when the block ends without error.

    On any error the half-built folder is removed and the error goes on. The caller checks beforehand that
    `final` may be created (absent, or an empty folder).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    staging = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(final)}{os.getpid()}-", dir=final.parent))
    try:
        shutil.rmtree(staging)  # an unused name: the builder creates it
        yield staging
        os.replace(staging, final)
    except BaseException:
        remove_tree(staging)
        raise


def remove_tree(folder: Path, attempts: int = 20) -> None:
    """Remove a half-built folder. zarr writes a group's files concurrently and does not cancel the other writes
    when one fails, so a file can appear while the folder is being removed: try again until it is gone."""
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.05)
    log.warning("could not remove %s; the next run creating this store removes it", folder)


def remove_stale_staging(final: Path) -> None:
    """Remove the half-built folders of builders that were killed (their process on this host is gone).

    A builder whose process still runs is left alone (two runs creating one store at once: the second to finish
    finds that the store exists).
    """
    prefix = staging_prefix(final)
    for folder in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid_text = folder.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        log.warning("removing %s: a run creating %s was stopped before it finished", folder, final)
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
