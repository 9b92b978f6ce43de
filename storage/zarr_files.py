"""Where this project leans on zarr's internals, in one place: a zarr upgrade should touch only this file.

Two facts of zarr 3's local store that the code depends on, measured with zarr 3.1:
- A chunk of an array whose only codec is the `bytes` codec (no compressor, no filter, no sharding) is a file
  holding the chunk's raw values in C order, native byte order, edge chunks padded to the full chunk shape. Its
  path is the store's root, the array's path and the chunk key (`metadata.encode_chunk_key`). The loader reads
  the frames it needs straight from such files with `os.preadv` (~50 ms for a batch of 64 real-sized samples
  against ~430 ms through zarr, which decodes whole chunks).
- `LocalStore` writes a chunk file to `<key>.<uuid>.partial` and renames it into place; a process killed in
  between leaves the temporary file behind.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import zarr

log = logging.getLogger(__name__)


def is_url(path: str) -> bool:
    """True for an fsspec URL (s3://, gs://, memory://...), False for a local path."""
    return "://" in str(path)


def local_folder(array: zarr.Array) -> Path | None:
    """The folder of the array's chunk files, when its store is a local one."""
    from zarr.storage import LocalStore

    store = array.store_path.store
    if not isinstance(store, LocalStore):
        return None
    return Path(store.root) / array.store_path.path


def chunk_file(array: zarr.Array, chunk: int) -> Path | None:
    """The file of chunk `chunk` along the first axis (whole along the others), for a local store."""
    folder = local_folder(array)
    if folder is None:
        return None
    return folder / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def raw_chunk_folder(array: zarr.Array) -> Path | None:
    """The chunk folder when every chunk file is the raw C-order native-endian array of whole first-axis rows (the
    layout `os.preadv` can read), else None: another zarr format, a codec, sharding, a remote store."""
    from zarr.codecs import BytesCodec

    codecs = getattr(array.metadata, "codecs", None)
    if array.metadata.zarr_format != 3 or codecs is None or len(codecs) != 1:
        return None
    if not isinstance(codecs[0], BytesCodec) or tuple(array.chunks[1:]) != tuple(array.shape[1:]):
        return None
    endian = codecs[0].endian
    if array.dtype.itemsize > 1 and (endian is None or endian.value != sys.byteorder):
        return None
    return local_folder(array)


def remove_partial_files(array: zarr.Array, chunk: int) -> None:
    """Remove the `*.partial` files a writer of this chunk left when it was killed mid-write.

    Only the writer that owns a chunk calls this, so no live write of another process is touched.
    """
    target = chunk_file(array, chunk)
    if target is None:
        return
    for leftover in target.parent.glob(f"{target.name}.*.partial"):
        log.info("removing %s, left by a writer that was stopped mid-write", leftover)
        leftover.unlink(missing_ok=True)
