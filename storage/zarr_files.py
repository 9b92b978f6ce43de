"""Where this project leans on zarr's internals, in one place: a zarr upgrade should touch only this file.

Two facts of zarr 3's local store that the code depends on, measured with zarr 3.1:
- A chunk of an array whose only codec is the `bytes` codec (no compressor, no filter, no sharding) is a file
  holding the chunk's raw values in C order, native byte order, edge chunks padded to the full chunk shape. Its
  path is the store's root, the array's path and the chunk key (`metadata.encode_chunk_key`). The loader reads
  the frames it needs straight from such files with `os.preadv` (~50 ms for a batch of 64 real-sized samples
  against ~430 ms through zarr, which decodes whole chunks).
- `LocalStore` writes a chunk file to `<key>.<uuid>.partial` and renames it into place; a process killed in
  between leaves the temporary file behind.
- On an object store (zarr's `FsspecStore`: s3://, gs://, ...) a chunk is one object under the same key, and
  the store's `get_partial_values` fetches byte ranges of many objects concurrently (s3fs: one ranged GET each,
  gathered on zarr's event loop). `read_byte_ranges` uses it, so the loader reads only the frames it needs from
  an object store too. An object is written by one PUT, which S3 makes visible whole or not at all.
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


def is_raw(array: zarr.Array) -> bool:
    """True when every chunk (file or object) is the raw C-order native-endian array of whole first-axis rows, so
    byte ranges of it are frames: False for another zarr format, a compressor, sharding, another byte order."""
    from zarr.codecs import BytesCodec

    codecs = getattr(array.metadata, "codecs", None)
    if array.metadata.zarr_format != 3 or codecs is None or len(codecs) != 1:
        return False
    if not isinstance(codecs[0], BytesCodec) or tuple(array.chunks[1:]) != tuple(array.shape[1:]):
        return False
    endian = codecs[0].endian
    return array.dtype.itemsize == 1 or (endian is not None and endian.value == sys.byteorder)


def raw_chunk_folder(array: zarr.Array) -> Path | None:
    """The chunk folder when the chunks are raw (`is_raw`) files of a local store (what `os.preadv` reads)."""
    return local_folder(array) if is_raw(array) else None


def read_byte_ranges(array: zarr.Array, requests: list[tuple[int, int, int]]) -> list[bytes | None]:
    """Bytes [start, stop) of chunk `chunk` along the first axis, for every (chunk, start, stop), fetched
    concurrently through the array's store; None where the chunk was never written (it holds the fill value)."""
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store_path = array.store_path
    tail = (0,) * (array.ndim - 1)
    key_ranges = [(f"{store_path.path}/{array.metadata.encode_chunk_key((chunk, *tail))}".lstrip("/"),
                   RangeByteRequest(start, stop)) for chunk, start, stop in requests]
    buffers = sync(store_path.store.get_partial_values(default_buffer_prototype(), key_ranges))
    return [None if buffer is None else buffer.to_bytes() for buffer in buffers]


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
