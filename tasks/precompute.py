"""Precompute: listing -> store -> (fetch, decode, encode, write, commit) for each chunk of rows.

Plain functions (tests call them directly); the Prefect tasks around them are in tasks/precompute_tasks.py.
Tasks carry paths and row ranges, never tensors: frames travel from the decode workers to the encoder inside one
task.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from model.encoders import EncoderConfig, FrameEncoder, describe_encoders
from storage.attrs import SamplingRecord, StoreAttrs, StoreExpectation
from storage.store import FAILED, OK, PENDING, ChunkRows, FeatureShapes, FeatureStore, StoreConfig, StoreError
from tasks.decode import DecodeConfig, DecodePool
from tasks.download import (
    DownloadError,
    PermanentDownloadError,
    download_folder,
    fetch,
    is_remote,
    redact_url,
)
from tasks.listing import Listing
from tasks.runtime import progress_bar, resolve_device

log = logging.getLogger(__name__)


class PrecomputeConfig(BaseModel):
    """How the rows of a store are filled."""

    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="DINOv2 + VAE to run")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="frame sampling and decode workers")
    layout: StoreConfig = Field(default_factory=StoreConfig, description="chunking of a new store")
    device: str = Field("auto", description="encoder device: auto (cuda when present), cpu, cuda, cuda:1, ...")
    prefetch_chunks: int = Field(2, ge=1, le=64, description="chunks decoded ahead of the one being encoded")
    retry_failed: bool = Field(True, description="a rerun also retries rows that failed before")
    download_dir: str | None = Field(None, description="where remote sources are fetched (default: temp dir)")
    keep_downloads: bool = Field(False, description="keep fetched files after their chunk is committed")

    @model_validator(mode="after")
    def _one_frame_size(self) -> "PrecomputeConfig":
        """The decoder crops frames to the size the encoders take: one size, the encoder's (its shapes follow)."""
        if self.decode.size != self.encoder.frame_size:
            raise ValueError(
                f"decode.size ({self.decode.size}) differs from encoder.frame_size ({self.encoder.frame_size}): "
                f"frames are decoded at the size the encoders take; set both to the same value "
                f"(--decode.size and --encoder.frame-size)")
        return self


# ---- store preparation ---------------------------------------------------------------------------------


def new_store_attrs(listing: Listing, config: PrecomputeConfig) -> StoreAttrs:
    """What a new store records of this run: encoders, frame choice and size, the listing it was made from."""
    return StoreAttrs(frame_size=config.encoder.frame_size, resize=config.decode.resize_rule,
                      sampling=config.decode.sampling_record(), listing=listing.summary,
                      **describe_encoders(config.encoder))


def prepare_store(path: str, listing: Listing, config: PrecomputeConfig) -> FeatureStore:
    """Open the store made from this listing, or create it at full size from one process.

    A local store is built under a temporary name and renamed into place, so a run killed while creating
    it leaves nothing half made behind.
    """
    if FeatureStore.exists(path):
        store = FeatureStore.open(path, mode="r+")
        check_can_continue(store, listing, config)
        return store
    videos = listing.videos
    if videos.empty:
        raise StoreError(f"the listing of {listing.summary.get('manifest')} kept no videos: nothing to store")
    attrs = new_store_attrs(listing, config)
    shapes = FeatureShapes(frames=config.decode.frames, tokens=attrs.dino.tokens, feature_dim=attrs.dino.dim,
                           latent_shape=tuple(attrs.vae.latent_shape))
    store = FeatureStore.create(
        path, videos["video_id"].tolist(), videos["caption"].tolist(), videos["source"].tolist(),
        videos["duration_s"].astype(float).tolist(), attrs, config.layout, shapes, atomic=True,
    )
    log.info("created store %s (%d videos)", path, len(videos))
    return store


def check_can_continue(store: FeatureStore, listing: Listing, config: PrecomputeConfig) -> None:
    """Refuse to continue a store that was made with other encoders, other frames or from another listing."""
    expected = StoreExpectation(dino_id=config.encoder.dino_id, vae_id=config.encoder.vae_id,
                                sampling=config.decode.sampling_record(), frame_size=config.encoder.frame_size)
    mismatches = {m.field: m for m in store.check_compatible(expected)}
    for key in ("dino", "vae"):
        if key in mismatches:
            have, want = mismatches[key].have, mismatches[key].want
            raise StoreError(f"store {store.path} was encoded with {key} {have!r}, this run uses {want!r}")
    if "frame_size" in mismatches:
        have, want = mismatches["frame_size"].have, mismatches["frame_size"].want
        raise StoreError(f"store {store.path} holds frames of {have} px, this run encodes {want} px: use a new "
                         f"--store, or the store's frame size")
    if "sampling" in mismatches:
        have, want = mismatches["sampling"].have, mismatches["sampling"].want
        flags = f"--sampling {have.mode}" + (f" --window-frames {have.window_frames}" if have.mode == "window" else "")
        raise StoreError(f"store {store.path} keeps {have.describe()} of each video, this run asks for "
                         f"{want.describe()}; rows chosen two ways would mix two experiments: use a new --store, "
                         f"or {flags}")
    check_same_listing(store, listing.videos["video_id"].tolist(), listing.summary)


def check_same_listing(store: FeatureStore, video_ids: list[str], summary: dict[str, Any]) -> None:
    """Refuse to continue a store made from another listing.

    The same manifest with the same bounds may keep a few other rows today than when the store was made (a
    remote file that could not be probed then, or now): the store's rows stay what they are, with a warning that
    says how many differ, since refusing would stop an unattended rerun for a transient network error.
    """
    stored = [str(v) for v in store.read_column("video_id")]
    listed = [str(v) for v in video_ids]
    if stored == listed:
        return
    made_from = store.attributes.listing
    same_listing = all(made_from.get(key) == summary.get(key)
                       for key in ("manifest", "min_duration_s", "max_duration_s"))
    new, gone = sorted(set(listed) - set(stored)), sorted(set(stored) - set(listed))
    if same_listing:
        log.warning("store %s keeps its %d rows: this listing of the same manifest keeps %d the store does not "
                    "have (e.g. %s) and drops %d it has (e.g. %s); use a new --store to include new rows",
                    store.path, len(stored), len(new), new[:3], len(gone), gone[:3])
        return
    raise StoreError(
        f"store {store.path} holds {len(stored)} videos of another listing (this listing keeps "
        f"{len(listed)}; e.g. not in the store: {new[:3]}); use a new --store or the same manifest and filters"
    )


NON_FINITE = "encoder output has NaN or inf values (a float16 overflow?); rerun on float32 or check the frames"

# ---- the chunk pipeline --------------------------------------------------------------------------------

FetchFn = Callable[[list[str]], dict[str, dict[str, str | None]]]


@dataclass
class EncodeReport:
    """What one call of encode_chunks did."""

    chunks: int = 0
    videos_ok: int = 0
    videos_failed: int = 0
    videos_deferred: int = 0  # left pending: their download kept failing in ways a later run may not
    seconds: float = 0.0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    # One record per committed chunk: {"chunk", "seconds" (since the call started), "videos" (done in it)}.
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def videos_per_s(self) -> float:
        done = self.videos_ok + self.videos_failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "videos_ok": self.videos_ok, "videos_failed": self.videos_failed,
                "videos_deferred": self.videos_deferred,
                "seconds": round(self.seconds, 3), "videos_per_s": round(self.videos_per_s, 3),
                "failed_by_reason": self.failed_by_reason, "commits": self.commits}


def fetch_sources(urls: list[str], dest_dir: str) -> dict[str, dict[str, str | None]]:
    """Download remote sources. Permanent failures are recorded; transient ones raise (for retries)."""
    fetched: dict[str, dict[str, str | None]] = {}
    for url in urls:
        try:
            fetched[url] = {"path": str(fetch(url, Path(dest_dir))), "error": None}
        except PermanentDownloadError as err:
            fetched[url] = {"path": None, "error": f"download failed: {err}"}
    return fetched


@dataclass
class _ScheduledChunk:
    chunk: int
    rows: list[int]  # rows of this chunk to do (not ok yet)
    errors: dict[int, str]  # rows that failed before decoding (a permanent download error)
    downloads: list[str]  # fetched files to remove after commit
    deferred: dict[int, str] = field(default_factory=dict)  # rows left as they are: transient download errors


class ChunkPipeline:
    """Decode chunks ahead in worker processes while the current chunk is encoded and written."""

    def __init__(self, store: FeatureStore, config: PrecomputeConfig, fetch_fn: FetchFn | None = None):
        self.store = store
        self.config = config
        self.download_dir = str(download_folder(config.download_dir))
        self.fetch_fn = fetch_fn or (lambda urls: fetch_sources(urls, self.download_dir))
        self.status = store.read_status()
        self.sources = store.read_column("source")

    def run(self, chunks: list[int], on_chunk: Callable[[int, EncodeReport], None] | None = None) -> EncodeReport:
        report = EncodeReport()
        started = time.perf_counter()
        device = resolve_device(self.config.device)
        threads = torch.get_num_threads()
        if device == "cpu":
            # The decode workers need the cores too: OpenMP threads that outnumber free cores spin and stall.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - self.config.decode.workers))
        todo = sum(int((self.status[self.store.chunk_rows(c)] != OK).sum()) for c in chunks)
        self.bar = progress_bar(total=todo, unit="video", desc="precompute")
        try:
            with DecodePool(self.config.decode) as pool:
                # The first chunks decode while the encoders load (a second or more of imports and weights).
                ahead = deque(self._schedule(pool, c) for c in chunks[:self.config.prefetch_chunks])
                encoder = FrameEncoder(self.config.encoder, device)
                self._run(pool, encoder, ahead, iter(chunks[self.config.prefetch_chunks:]), report, started,
                          on_chunk)
        finally:
            torch.set_num_threads(threads)
            self.bar.close()
        report.seconds = time.perf_counter() - started
        return report

    def _run(self, pool: DecodePool, encoder: FrameEncoder, ahead: deque[_ScheduledChunk], upcoming: Iterator[int],
             report: EncodeReport, started: float, on_chunk: Callable[[int, EncodeReport], None] | None) -> None:
        while ahead:
            current = ahead.popleft()
            next_chunk = next(upcoming, None)
            if next_chunk is not None:  # keep the decoders busy while this chunk is encoded
                ahead.append(self._schedule(pool, next_chunk))
            done = report.videos_ok + report.videos_failed
            self._commit(pool, encoder, current, report)
            report.seconds = time.perf_counter() - started
            report.commits.append({"chunk": current.chunk, "seconds": round(report.seconds, 3),
                                   "videos": report.videos_ok + report.videos_failed - done})
            if on_chunk is not None:
                on_chunk(current.chunk, report)

    def _schedule(self, pool: DecodePool, chunk: int) -> _ScheduledChunk:
        span = self.store.chunk_rows(chunk)
        retry = {PENDING, FAILED} if self.config.retry_failed else {PENDING}
        rows = [r for r in span if self.status[r] in retry]
        errors: dict[int, str] = {}
        deferred: dict[int, str] = {}
        local = {r: str(self.sources[r]) for r in rows}
        remote = sorted({src for src in local.values() if is_remote(src)})
        downloads: list[str] = []
        if remote:
            try:
                fetched = self.fetch_fn(remote)
            except DownloadError as err:
                # Retries exhausted on a network error, a timeout, a 5xx: not the videos' fault. Their rows are
                # left as they are (pending) for the next run; the rest of the chunk goes on.
                fetched = {}
                deferred = {r: f"download failed: {err}" for r, src in local.items() if src in remote}
                for r in deferred:
                    local.pop(r)
                rows = [r for r in rows if r not in deferred]
            for r, src in list(local.items()):
                if src in fetched:
                    if fetched[src]["error"]:
                        errors[r] = str(fetched[src]["error"])
                    else:
                        local[r] = str(fetched[src]["path"])
                        downloads.append(local[r])
        for r in rows:
            if r not in errors:
                pool.submit(str(r), local[r])
        return _ScheduledChunk(chunk, rows, errors, downloads, deferred)

    def _commit(self, pool: DecodePool, encoder: FrameEncoder, item: _ScheduledChunk, report: EncodeReport) -> None:
        """Collect a chunk's decoded videos, encode them, write and commit the chunk, count what happened."""
        errors = dict(item.errors)
        decoded: dict[int, np.ndarray] = {}
        intervals: dict[int, float] = {}
        for r in item.rows:
            if r in errors:
                continue
            result = pool.get(str(r))
            if result.error is not None:
                errors[r] = result.error
            else:
                decoded[r], intervals[r] = result.frames, result.interval_s
        rows = self._encode_rows(item, decoded, intervals, errors, encoder)
        self.store.write_chunk(item.chunk, rows)
        span = self.store.chunk_rows(item.chunk)
        self.status[span.start:span.stop] = rows.status
        if not self.config.keep_downloads:
            for path in item.downloads:
                Path(path).unlink(missing_ok=True)
        self.bar.update(len(item.rows) + len(item.deferred))
        report.chunks += 1
        report.videos_ok += len(decoded)
        report.videos_failed += len(errors)
        report.videos_deferred += len(item.deferred)
        for r, reason in sorted(item.deferred.items()):
            log.warning("row %d (%s) left for the next run: %s", r, redact_url(str(self.sources[r])), reason)
        for reason in errors.values():
            report.failed_by_reason[reason] = report.failed_by_reason.get(reason, 0) + 1
        for r, reason in sorted(errors.items()):
            log.warning("row %d (%s) failed: %s", r, redact_url(str(self.sources[r])), reason)

    def _encode_rows(self, item: _ScheduledChunk, decoded: dict[int, np.ndarray], intervals: dict[int, float],
                    errors: dict[int, str], encoder: FrameEncoder) -> ChunkRows:
        """Assemble the whole chunk: rows done now, plus rows committed by an earlier run.

        A video whose encoder output is not finite moves from `decoded` to `errors` (the caller counts both).
        """
        span = self.store.chunk_rows(item.chunk)
        shapes = self.store.shapes
        if any(self.status[r] == OK for r in span):
            rows = self.store.read_chunk(item.chunk)
        else:
            n = len(span)
            rows = ChunkRows(
                features=np.zeros((n, shapes.frames, shapes.tokens, shapes.feature_dim), np.float16),
                latents=np.zeros((n, shapes.frames, *shapes.latent_shape), np.float16),
                status=np.full(n, PENDING, np.uint8), error=[""] * n,
                frame_interval_s=np.full(n, np.nan, np.float32),
            )
        if decoded:
            order = sorted(decoded)
            frames = np.concatenate([decoded[r] for r in order])  # frames of all videos: one encoder batch
            features, latents = encoder.encode(frames)
            per_video = shapes.frames
            for i, r in enumerate(order):
                j = r - span.start
                video_features = features[i * per_video:(i + 1) * per_video]
                video_latents = latents[i * per_video:(i + 1) * per_video]
                if not (np.isfinite(video_features).all() and np.isfinite(video_latents).all()):
                    # A half-precision overflow (the SD-VAE is known for it) would poison every batch that
                    # draws this row: a failed row, never an ok one.
                    decoded.pop(r)
                    errors[r] = NON_FINITE
                    continue
                rows.features[j] = video_features
                rows.latents[j] = video_latents
                rows.frame_interval_s[j] = intervals[r]
                rows.status[j], rows.error[j] = OK, ""
        for r, reason in errors.items():
            j = r - span.start
            rows.features[j], rows.latents[j], rows.frame_interval_s[j] = 0, 0, np.nan
            rows.status[j], rows.error[j] = FAILED, reason
        return rows


def encode_chunks(store_path: str, chunks: list[int], config: PrecomputeConfig, fetch_fn: FetchFn | None = None,
                  on_chunk: Callable[[int, EncodeReport], None] | None = None) -> EncodeReport:
    """Fill the given chunks of a store; rows already ok are kept, the rest are decoded and encoded.

    Chunks with nothing left to do are skipped, so a retried or restarted call only does what is missing.
    The unit of work is a whole chunk (never a row range), so concurrent callers with disjoint chunk lists
    never write the same file; a chunk index the store does not have is refused rather than skipped.
    """
    store = FeatureStore.open(store_path, mode="r+")
    unknown = [c for c in chunks if not isinstance(c, (int, np.integer)) or not 0 <= c < store.num_chunks]
    if unknown:
        raise StoreError(f"store {store_path} has chunks 0-{store.num_chunks - 1} of {store.chunk_videos} rows; "
                         f"asked for {unknown[:5]}: hand each worker whole chunk indices of this store")
    chunks = list(dict.fromkeys(int(c) for c in chunks))
    todo = set(store.pending_chunks(config.retry_failed))
    return ChunkPipeline(store, config, fetch_fn).run([c for c in chunks if c in todo], on_chunk)


def store_counts(store_path: str) -> dict[str, int]:
    """videos / ok / failed / pending of a store."""
    return FeatureStore.open(store_path).counts()


def split_chunks(chunks: list[int], parts: int) -> list[list[int]]:
    """Split chunk indices into at most `parts` contiguous, non-empty runs (one per worker)."""
    parts = max(1, min(parts, len(chunks)))
    bounds = np.linspace(0, len(chunks), parts + 1).round().astype(int)
    return [chunks[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def precompute_table(info: dict[str, Any], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the final table: the counts and rates a user acts on first (the UI shows 10 rows a page), then
    what the rows hold, then the drop and failure reasons."""
    listing = info.get("listing", {})
    seconds = sum(r["seconds"] for r in reports)
    done = sum(r["videos_ok"] + r["videos_failed"] for r in reports)
    per_video = info["sizes"]["disk_bytes_per_ok_video"]
    rows: list[dict[str, Any]] = [
        {"metric": "listed rows", "value": listing.get("rows")},
        {"metric": "kept", "value": listing.get("kept")},
        {"metric": "ok", "value": info["ok"]}, {"metric": "failed", "value": info["failed"]},
        {"metric": "pending", "value": info["pending"]},
        {"metric": "videos/s (this run)", "value": round(done / seconds, 3) if seconds else None},
        # A retried download shows in the UI only on its own task run's page ("Retry 1/3" in its logs).
        {"metric": "download retries (this run)", "value": sum(r.get("fetch_retries", 0) for r in reports)},
        {"metric": "bytes per ok video", "value": format_bytes(per_video) if per_video else None},
        {"metric": "frames kept", "value": SamplingRecord.model_validate(info["sampling"]).describe()},
        {"metric": "median seconds between stored frames", "value": info["frame_interval"]["median_s"]},
    ]
    rows += [{"metric": f"dropped: {reason}", "value": n} for reason, n in listing.get("dropped", {}).items() if n]
    rows += [{"metric": f"failed: {reason}", "value": n} for reason, n in info["failed_by_reason"].items()]
    return rows


def format_bytes(count: float) -> str:
    """6874665 -> "6.56 MiB (6,874,665 bytes)"."""
    value, unit = float(count), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{round(count):,} bytes" if unit == "bytes" else f"{value:.3g} {unit} ({round(count):,} bytes)"
