"""The feature store: one Zarr v3 group, one row per kept video.

Layout (DESIGN.md):

    dino_features  (V, F, 325, 384) float16   K videos per chunk (int8 codes with the compact codec, plus
    dino_scale, dino_offset (V, 384) float32   their per-video, per-channel scales: storage.feature_codec)
    latents        (V, F, 4, 32, 32) float16  K videos per chunk
    status         (V,) uint8                 0 pending, 1 ok, 2 failed; the commit mark
    video_id, caption, source, error  (V,) str
    duration_s     (V,) float32
    frame_interval_s (V,) float32             mean seconds between the row's stored frames (NaN: unknown)

Schema 2 added `frame_interval_s` and the `sampling` attribute (which frames of a video a row keeps: the seed's
window of the first 72 frames, or spread over the whole video).

Why it is written the way it is: two writers touching the same chunk lose data and concurrent resizes lose
rows, so one process creates every array at full size, each writer owns whole chunk-aligned row ranges and
writes each chunk in one call, and `status` is written last. A row whose status is not ok is simply done again
by the next run. Chunk files are replaced atomically by zarr's local store, so a killed writer leaves either
the old chunk or the new one, never half of one (plus, at worst, a `*.partial` temporary file, which the next
writer of that chunk removes); on an object store (s3://bucket/x.zarr, through zarr's fsspec store) each chunk
is one object put whole. `create` sets the group attributes last: a group without `schema_version` is one
whose creation was interrupted (a local store is built under a temporary name, so only a remote one can be
found so, and the next `create` replaces it: every row of it was still pending).

A write that fails (disk full, file-size limit, read-only or forbidden folder) raises StoreWriteError and
commits nothing of its chunk: its rows stay pending, since a full disk is not the videos' fault.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import zarr
from pydantic import BaseModel, Field

from storage.attrs import SCHEMA_VERSION, Mismatch, StoreAttrs, StoreExpectation, compare
from storage.feature_codec import STORED_DTYPE, FeatureCodec, dequantise_int8, quantise_int8
from storage.staging import staged_folder
from storage.zarr_files import is_url, remove_partial_files

log = logging.getLogger(__name__)

PENDING, OK, FAILED = 0, 1, 2
ROW_ARRAYS = ("status", "video_id", "caption", "source", "error", "duration_s", "frame_interval_s")


class StoreError(RuntimeError):
    """A store that cannot be opened or used as asked; the message says what to do."""


class StoreWriteError(StoreError):
    """Writing to the store failed (disk full, read-only, no permission); nothing of the chunk was committed."""


def describe_write_error(path: str, what: str, err: OSError) -> str:
    """A message that names the store, what was being written, the OS's reason and what to do about it."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        todo = f"free disk space (or raise the quota / file-size limit) where {path} lives"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"check that this user may write to {path} and that its filesystem is not mounted read-only"
    else:
        todo = f"check the disk that holds {path}"
    where = f" ({err.filename})" if err.filename else ""
    return f"could not write {what} of store {path}: {reason}{where}; {todo}, then rerun the same command"


class StoreConfig(BaseModel):
    """How a new store is laid out (an existing store keeps the layout it was created with)."""

    chunk_videos: int = Field(8, ge=1, le=1024, description="K: videos per chunk of the feature arrays")
    compression: Literal["none", "zstd", "blosc"] = Field(
        "none", description="lossless compressor of the feature arrays: 'none' reads fastest (only the needed "
                            "frames, from disk or with ranged requests); 'zstd' and 'blosc' (zstd after a byte "
                            "shuffle) save a little space and decode whole chunks"
    )
    feature_codec: FeatureCodec = Field(
        "float16", description="how dino_features are stored: 'float16' as encoded, or 'int8' codes with "
                               "per-video, per-channel scales (half the bytes; dequantised on the training device)"
    )


@dataclass(frozen=True)
class FeatureShapes:
    """Per-video array shapes, fixed by the encoders."""

    frames: int = 24
    tokens: int = 325
    feature_dim: int = 384
    latent_shape: tuple[int, int, int] = (4, 32, 32)


@dataclass
class ChunkRows:
    """The rows of one chunk as they are committed: features for ok rows, a reason for failed ones."""

    features: np.ndarray  # (n, F, N, D) float16 (float32 when read back from an int8 store)
    latents: np.ndarray  # (n, F, 4, 32, 32) float16
    status: np.ndarray  # (n,) uint8
    error: list[str]
    caption: list[str] | None = None  # only when captions are learnt while writing (import of .pt files)
    frame_interval_s: np.ndarray | None = None  # (n,) float32 seconds between stored frames; None: left as is


class FeatureStore:
    """A feature store on disk (or at an fsspec URL). Create with `create`, open with `open`."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self.attrs: dict[str, Any] = dict(group.attrs)  # the record as stored; code reads `attributes`
        self.attributes = StoreAttrs.model_validate(self.attrs)
        self.feature_codec: str = self.attributes.feature_codec
        features = group["dino_features"]
        self.num_videos: int = features.shape[0]
        self.chunk_videos: int = features.chunks[0]
        self.shapes = FeatureShapes(
            frames=features.shape[1],
            tokens=features.shape[2],
            feature_dim=features.shape[3],
            latent_shape=tuple(group["latents"].shape[2:]),
        )

    # ---- creation and opening ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        video_ids: Sequence[str],
        captions: Sequence[str],
        sources: Sequence[str],
        durations: Sequence[float],
        attrs: StoreAttrs | Mapping[str, Any] | None = None,
        config: StoreConfig | None = None,
        shapes: FeatureShapes | None = None,
        atomic: bool = False,
    ) -> "FeatureStore":
        """Create every array at full size and write the row metadata; all rows start pending.

        `attrs`: what the caller knows (encoders, sampling, listing summary); the layout is added here. With
        `atomic`, a local store is built under a temporary name and renamed into place (storage.staging), so a
        run killed while creating it leaves nothing half made behind; a write failure is a StoreWriteError. An
        object store has no rename: there `atomic` replaces a store whose creation was interrupted (a group
        without `schema_version`), so two runs must not create the same URL at once (precompute creates the
        store from one process before any worker starts).
        """
        config, shapes = config or StoreConfig(), shapes or FeatureShapes()
        n = len(video_ids)
        if not (len(captions) == len(sources) == len(durations) == n):
            raise ValueError("video_ids, captions, sources and durations must have the same length")
        if n == 0:
            raise StoreError(f"no videos to store at {path}: the listing kept none (see its summary)")
        record = StoreAttrs.model_validate(attrs or {}).model_copy(update={
            "schema_version": SCHEMA_VERSION, "frames": shapes.frames, "tokens": shapes.tokens,
            "feature_dim": shapes.feature_dim, "latent_shape": list(shapes.latent_shape),
            "chunk_videos": config.chunk_videos, "compression": config.compression,
            "feature_codec": config.feature_codec,
        })
        columns = (video_ids, captions, sources, durations)
        path = str(path)
        if is_url(path) and atomic:
            remove_interrupted(path)
        if not atomic or is_url(path):
            return cls._build(path, columns, record, config, shapes)
        final = Path(path)
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise StoreError(f"{final} exists and is not a feature store; choose another --store or remove it")
        try:
            with staged_folder(final) as staging:
                cls._build(str(staging), columns, record, config, shapes)
        except OSError as err:
            raise StoreWriteError(describe_write_error(path, "the new store", err)) from err
        return cls.open(path, mode="r+")

    @classmethod
    def _build(cls, path: str, columns: tuple[Sequence, ...], record: StoreAttrs, config: StoreConfig,
               shapes: FeatureShapes) -> "FeatureStore":
        """Every array at full size, the row columns, then the attributes: a group without `schema_version` is
        one whose creation was interrupted."""
        video_ids, captions, sources, durations = columns
        n, k = len(video_ids), config.chunk_videos
        group = zarr.open_group(path, mode="w-")
        compressors = _compressors(config.compression)
        for name, per_video, dtype in (
                ("dino_features", (shapes.frames, shapes.tokens, shapes.feature_dim), STORED_DTYPE[config.feature_codec]),
                ("latents", (shapes.frames, *shapes.latent_shape), "float16")):
            group.create_array(name, shape=(n, *per_video), chunks=(k, *per_video), dtype=dtype,
                               compressors=compressors, fill_value=0)
        if config.feature_codec == "int8":
            for name, fill in (("dino_scale", 1.0), ("dino_offset", 0.0)):
                group.create_array(name, shape=(n, shapes.feature_dim), chunks=(k, shapes.feature_dim),
                                   dtype="float32", fill_value=fill)
        group.create_array("status", shape=(n,), chunks=(k,), dtype="uint8", fill_value=PENDING)
        for name in ("duration_s", "frame_interval_s"):
            group.create_array(name, shape=(n,), chunks=(k,), dtype="float32", fill_value=float("nan"))
        for name in ("video_id", "caption", "source", "error"):
            group.create_array(name, shape=(n,), chunks=(k,), dtype=str, fill_value="")
        group["video_id"][:] = np.asarray(video_ids, dtype=object)
        group["caption"][:] = np.asarray(captions, dtype=object)
        group["source"][:] = np.asarray(sources, dtype=object)
        group["duration_s"][:] = np.asarray(durations, dtype=np.float32)
        group.attrs.update(record.to_json())
        log.info("created store %s: %d videos in %d chunks of %d", path, n, -(-n // k), k)
        return cls(group, path)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: Literal["r", "r+"] = "r") -> "FeatureStore":
        """Open an existing store, checking that it is one of ours and of a schema this code reads."""
        path = str(path)
        if not is_url(path) and not Path(path).exists():
            raise StoreError(f"feature store {path} does not exist (run `fvlm precompute` or check --store)")
        try:
            group = zarr.open_group(path, mode=mode)
        except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(f"{path} is not a Zarr group: {err}") from err
        version = group.attrs.get("schema_version")
        needed = ["dino_features", "latents", *ROW_ARRAYS]
        if group.attrs.get("feature_codec") == "int8":
            needed += ["dino_scale", "dino_offset"]
        missing = [name for name in needed if name not in group]
        if version is None and "dino_features" in group:
            raise StoreError(f"{path} is a feature store whose creation was interrupted (it has no schema_version); "
                             f"delete it and run again: every row of it was still pending")
        if version is None or missing:
            raise StoreError(f"{path} is not a feature store (missing: {missing or ['schema_version']})")
        if version != SCHEMA_VERSION:
            why = (" (schema 2 records which frames a row keeps: the seed's 72-frame window or the whole video; "
                   "precompute a new store)" if version == 1 else "")
            raise StoreError(f"{path} has store schema {version}; this code reads schema {SCHEMA_VERSION}{why}")
        return cls(group, path)

    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        path = str(path)
        if is_url(path):
            try:
                group = zarr.open_group(path, mode="r")
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                return False
            return not creation_interrupted(group)  # such a store is made again by `create(atomic=True)`
        return (Path(path) / "zarr.json").exists()

    def check_compatible(self, expected: StoreExpectation) -> list[Mismatch]:
        """Every way this store differs from what a run needs (precompute continuing it, training reading it)."""
        dtypes = {name: str(self.group[name].dtype) for name in ("dino_features", "latents")}
        return compare(self.attributes, expected, dtypes)

    # ---- rows and chunks --------------------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        return -(-self.num_videos // self.chunk_videos)

    def chunk_rows(self, chunk: int) -> range:
        """Row range of one chunk (the last chunk may be short)."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range (store has {self.num_chunks})")
        start = chunk * self.chunk_videos
        return range(start, min(start + self.chunk_videos, self.num_videos))

    def read_status(self) -> np.ndarray:
        return np.asarray(self.group["status"][:], dtype=np.uint8)

    def read_column(self, name: str, rows: slice | None = None) -> np.ndarray:
        if name not in ROW_ARRAYS:
            raise KeyError(f"{name} is not a row array; one of {ROW_ARRAYS}")
        return np.asarray(self.group[name][rows if rows is not None else slice(None)])

    def pending_chunks(self, retry_failed: bool = True) -> list[int]:
        """Chunks that still have rows to do: pending ones, and failed ones unless retry_failed is off."""
        status = self.read_status()
        todo = status == PENDING
        if retry_failed:
            todo |= status == FAILED
        return sorted({int(i) // self.chunk_videos for i in np.flatnonzero(todo)})

    def read_chunk(self, chunk: int) -> ChunkRows:
        """Everything committed in one chunk (used to keep ok rows when only some rows are redone)."""
        rows = self.chunk_rows(chunk)
        sl = slice(rows.start, rows.stop)
        return ChunkRows(
            features=self._features(sl),
            latents=np.asarray(self.group["latents"][sl]),
            status=np.asarray(self.group["status"][sl], dtype=np.uint8),
            error=[str(e) for e in self.group["error"][sl]],
            frame_interval_s=np.asarray(self.group["frame_interval_s"][sl], dtype=np.float32),
        )

    def read_features(self, row: int) -> np.ndarray:
        """The stored DINO features of one row: (F, N, D) float16 (dequantised for the int8 codec)."""
        return self._features(slice(row, row + 1))[0].astype(np.float16, copy=False)

    def _features(self, rows: slice) -> np.ndarray:
        """Features of a range of rows: float16 as stored, or float32 dequantised from int8 codes."""
        stored = np.asarray(self.group["dino_features"][rows])
        if self.feature_codec != "int8":
            return stored
        return dequantise_int8(stored, np.asarray(self.group["dino_scale"][rows]),
                               np.asarray(self.group["dino_offset"][rows]))

    def write_chunk(self, chunk: int, rows: ChunkRows) -> None:
        """Write one whole chunk, each array in one call, and `status` last: the commit mark."""
        span = self.chunk_rows(chunk)
        n = len(span)
        if rows.features.shape[0] != n or rows.latents.shape[0] != n or len(rows.status) != n:
            raise ValueError(f"chunk {chunk} has {n} rows; got {rows.features.shape[0]}")
        expected = (self.shapes.frames, self.shapes.tokens, self.shapes.feature_dim)
        if tuple(rows.features.shape[1:]) != expected:
            raise ValueError(f"features per video must be {expected}, got {tuple(rows.features.shape[1:])}")
        sl = slice(span.start, span.stop)
        try:
            for name in self.group.array_keys():
                remove_partial_files(self.group[name], chunk)
            self._write_features(sl, rows.features)
            self.group["latents"][sl] = rows.latents.astype(np.float16, copy=False)
            self.group["error"][sl] = np.asarray(rows.error, dtype=object)
            if rows.caption is not None:
                self.group["caption"][sl] = np.asarray(rows.caption, dtype=object)
            if rows.frame_interval_s is not None:
                self.group["frame_interval_s"][sl] = np.asarray(rows.frame_interval_s, dtype=np.float32)
            self.group["status"][sl] = rows.status.astype(np.uint8, copy=False)
        except OSError as err:  # status is written last: nothing of this chunk is committed
            what = f"chunk {chunk} (rows {span.start}-{span.stop - 1}; they stay pending)"
            raise StoreWriteError(describe_write_error(self.path, what, err)) from err

    def _write_features(self, rows: slice, features: np.ndarray) -> None:
        if self.feature_codec != "int8":
            self.group["dino_features"][rows] = features.astype(np.float16, copy=False)
            return
        codes, scale, offset = quantise_int8(features)
        self.group["dino_features"][rows] = codes
        self.group["dino_scale"][rows] = scale
        self.group["dino_offset"][rows] = offset

    # ---- reporting --------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        status = self.read_status()
        return {
            "videos": int(status.size),
            "ok": int((status == OK).sum()),
            "failed": int((status == FAILED).sum()),
            "pending": int((status == PENDING).sum()),
        }

    def failures(self) -> list[dict[str, str]]:
        """Failed rows with their reasons, in row order."""
        status = self.read_status()
        rows = np.flatnonzero(status == FAILED)
        if rows.size == 0:
            return []
        ids = self.read_column("video_id")
        errors = self.read_column("error")
        sources = self.read_column("source")
        return [{"row": int(r), "video_id": str(ids[r]), "source": str(sources[r]), "error": str(errors[r])}
                for r in rows]

    def disk_bytes(self) -> int | None:
        """Bytes the store takes on its disk or object store (None when the store cannot say)."""
        if is_url(self.path):
            return remote_bytes(self.path)
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())

    def frame_spacing(self) -> dict[str, Any]:
        """Seconds between the stored frames of ok rows (median, min, max), and how many rows know theirs."""
        values = self.read_column("frame_interval_s")[self.read_status() == OK].astype(np.float64)
        known = values[np.isfinite(values)]
        if known.size == 0:
            return {"median_s": None, "min_s": None, "max_s": None, "rows": 0}
        return {"median_s": round(float(np.median(known)), 4), "min_s": round(float(known.min()), 4),
                "max_s": round(float(known.max()), 4), "rows": int(known.size)}

    def info(self) -> dict[str, Any]:
        """Counts, failures grouped by reason, the listing summary, frame spacing, sizes and attributes."""
        counts = self.counts()
        failures = self.failures()
        by_reason: dict[str, int] = {}
        for failure in failures:
            by_reason[failure["error"]] = by_reason.get(failure["error"], 0) + 1
        disk = self.disk_bytes()
        feature_item = 1 if self.feature_codec == "int8" else 2
        per_video = self.shapes.frames * (feature_item * self.shapes.tokens * self.shapes.feature_dim
                                          + 2 * int(np.prod(self.shapes.latent_shape)))
        if self.feature_codec == "int8":
            per_video += 2 * 4 * self.shapes.feature_dim  # scale and offset
        attrs = {k: v for k, v in self.attrs.items() if k != "listing"}
        return {
            "path": self.path,
            **counts,
            "chunks": self.num_chunks,
            "chunk_videos": self.chunk_videos,
            "feature_codec": self.feature_codec,
            "failures": failures,
            "failed_by_reason": by_reason,
            "listing": self.attributes.listing,
            "sampling": self.attributes.sampling.model_dump(mode="json"),
            "frame_interval": self.frame_spacing(),
            "sizes": {
                "disk_bytes": disk,
                "feature_bytes_per_video": per_video,
                "disk_bytes_per_ok_video": (disk / counts["ok"]) if disk and counts["ok"] else None,
            },
            "attributes": attrs,
        }


def _compressors(compression: str) -> Any:
    if compression == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if compression == "blosc":  # float16's two bytes shuffled apart first: the exponent bytes compress
        return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    return None


def remote_bytes(url: str) -> int | None:
    """Total size of the objects under a store's URL (one listing), or None when the store cannot be listed."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        return int(fs.du(root, total=True))
    except (OSError, ValueError, NotImplementedError) as err:
        log.info("could not measure the size of %s: %s", url, type(err).__name__)
        return None


def creation_interrupted(group: zarr.Group) -> bool:
    """A group `create` began and did not finish: no schema_version, and empty or holding our feature array."""
    return group.attrs.get("schema_version") is None and ("dino_features" in group or not list(group.keys()))


def remove_interrupted(url: str) -> None:
    """Remove a remote store whose creation was interrupted (arrays but no schema_version: every row was still
    pending), so that it can be created again; refuse a URL that holds something else."""
    try:
        group = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return
    if group.attrs.get("schema_version") is not None:
        return  # a finished store: the caller opens it, or _build refuses to overwrite it
    if not creation_interrupted(group):
        raise StoreError(f"{url} holds a Zarr group that is not a feature store; choose another --store")
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    log.warning("removing %s: its creation was interrupted before any row was stored; creating it again", url)
    fs.rm(root, recursive=True)
