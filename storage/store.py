"""The feature store: one Zarr v3 group, one row per kept video.

Layout (DESIGN.md):

    dino_features  (V, F, 325, 384) float16   K videos per chunk
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
writer of that chunk removes). `create` sets the group attributes last: a group without `schema_version` is
one whose creation was interrupted.

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
    compression: Literal["none", "zstd"] = Field(
        "none", description="codec of the feature arrays; 'none' reads fastest, 'zstd' saves some disk"
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

    features: np.ndarray  # (n, F, N, D) float16
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
        run killed while creating it leaves nothing half made behind; a write failure is a StoreWriteError.
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
        })
        columns = (video_ids, captions, sources, durations)
        path = str(path)
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
        compressors = None if config.compression == "none" else zarr.codecs.ZstdCodec(level=3)
        for name, per_video in (("dino_features", (shapes.frames, shapes.tokens, shapes.feature_dim)),
                                ("latents", (shapes.frames, *shapes.latent_shape))):
            group.create_array(name, shape=(n, *per_video), chunks=(k, *per_video), dtype="float16",
                               compressors=compressors, fill_value=0.0)
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
        missing = [name for name in ("dino_features", "latents", *ROW_ARRAYS) if name not in group]
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
                zarr.open_group(path, mode="r")
                return True
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                return False
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
            features=np.asarray(self.group["dino_features"][sl]),
            latents=np.asarray(self.group["latents"][sl]),
            status=np.asarray(self.group["status"][sl], dtype=np.uint8),
            error=[str(e) for e in self.group["error"][sl]],
            frame_interval_s=np.asarray(self.group["frame_interval_s"][sl], dtype=np.float32),
        )

    def read_features(self, row: int) -> np.ndarray:
        """The stored DINO features of one row: (F, N, D) float16."""
        return np.asarray(self.group["dino_features"][row])

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
            for name in ("dino_features", "latents", *ROW_ARRAYS):
                remove_partial_files(self.group[name], chunk)
            self.group["dino_features"][sl] = rows.features.astype(np.float16, copy=False)
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
        """Bytes the store takes on a local disk (None for remote stores)."""
        if is_url(self.path):
            return None
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
        per_video = self.shapes.frames * 2 * (
            self.shapes.tokens * self.shapes.feature_dim + int(np.prod(self.shapes.latent_shape))
        )
        attrs = {k: v for k, v in self.attrs.items() if k != "listing"}
        return {
            "path": self.path,
            **counts,
            "chunks": self.num_chunks,
            "chunk_videos": self.chunk_videos,
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
