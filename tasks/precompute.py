"""Precompute: listing -> store -> (fetch, decode, encode, write, commit) for each chunk of rows.

Plain functions first (tests call them directly), Prefect tasks after. Tasks carry paths and row ranges,
never tensors: frames travel from the decode workers to the encoder inside one task.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from model.encoders import EncoderConfig, FrameEncoder, describe_encoders
from storage.store import (
    FAILED,
    OK,
    PENDING,
    ChunkRows,
    FeatureShapes,
    FeatureStore,
    StoreConfig,
    StoreError,
    StoreWriteError,
    describe_write_error,
)
from tasks.decode import DecodeConfig, DecodePool, describe_window
from tasks.download import DownloadError, PermanentDownloadError, fetch, is_remote, redact_url
from tasks.listing import Listing
from tasks.runtime import progress_bar, resolve_device

log = logging.getLogger(__name__)

RESIZE_RULE = "short side resized to frame_size, centre crop frame_size x frame_size"


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


# ---- store preparation ---------------------------------------------------------------------------------


def store_attributes(encoder: dict[str, Any], config: PrecomputeConfig, listing_summary: dict) -> dict[str, Any]:
    """Group attributes of a new store: what training needs to check that it reads what it expects."""
    return {
        "frame_size": config.encoder.frame_size,
        "resize": RESIZE_RULE,
        "sampling": config.decode.describe_sampling(),
        **encoder,
        "listing": listing_summary,
    }


def prepare_store(path: str, listing: Listing, config: PrecomputeConfig) -> FeatureStore:
    """Open the store made from this listing, or create it at full size from one process.

    A local store is built under a temporary name and renamed into place, so a run killed while creating
    it leaves nothing half made behind.
    """
    encoder = describe_encoders(config.encoder)
    videos = listing.videos
    if FeatureStore.exists(path):
        store = FeatureStore.open(path, mode="r+")
        check_store_matches(store, videos["video_id"].tolist(), encoder, listing.summary,
                            config.decode.describe_sampling())
        return store
    if listing.videos.empty:
        raise StoreError(f"the listing of {listing.summary.get('manifest')} kept no videos: nothing to store")
    shapes = FeatureShapes(
        frames=config.decode.frames, tokens=encoder["dino"]["tokens"], feature_dim=encoder["dino"]["dim"],
        latent_shape=tuple(encoder["vae"]["latent_shape"]),
    )
    attrs = store_attributes(encoder, config, listing.summary)
    columns = dict(
        video_ids=videos["video_id"].tolist(), captions=videos["caption"].tolist(),
        sources=videos["source"].tolist(), durations=videos["duration_s"].astype(float).tolist(),
        attrs=attrs, config=config.layout, shapes=shapes,
    )
    if "://" in path:
        return FeatureStore.create(path, **columns)
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise StoreError(f"{final} exists and is not a feature store; choose another --store or remove it")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(final)}{os.getpid()}-", dir=final.parent))
    except OSError as err:
        raise StoreWriteError(describe_write_error(str(final), "the new store", err)) from err
    try:
        shutil.rmtree(staging)
        FeatureStore.create(staging, **columns)
        os.replace(staging, final)
    except BaseException as err:
        remove_tree(staging)
        if isinstance(err, OSError):
            raise StoreWriteError(describe_write_error(str(final), "the new store", err)) from err
        raise
    log.info("created store %s (%d videos)", final, len(videos))
    return FeatureStore.open(final, mode="r+")


def remove_tree(folder: Path, attempts: int = 20) -> None:
    """Remove a half-built store. zarr writes a group's files concurrently and does not cancel the other writes
    when one fails, so a file can appear while the folder is being removed: try again until it is gone."""
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.05)
    log.warning("could not remove %s; the next run creating this store removes it", folder)


def staging_prefix(final: Path) -> str:
    """Name prefix of the folders a new store is built in before it is renamed into place."""
    return f".{final.name}.creating-{socket.gethostname()}-"


def remove_stale_staging(final: Path) -> None:
    """Remove the half-built stores of creators that were killed (their process on this host is gone).

    A killed creator leaves its `.NAME.creating-HOST-PID-*` folder behind; one whose process still runs is
    left alone (two runs creating one store at once: the second to finish reports that the store exists).
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


def check_store_matches(store: FeatureStore, video_ids: list[str], encoder: dict[str, Any],
                        summary: dict[str, Any] | None = None, sampling: dict[str, Any] | None = None) -> None:
    """Refuse to continue a store that was made from another listing, with other encoders or other frames.

    The same manifest with the same bounds may keep a few other rows today than when the store was made (a
    remote file that could not be probed then, or now): the store's rows stay what they are, with a warning that
    says how many differ, since refusing would stop an unattended rerun for a transient network error.
    """
    for key in ("dino", "vae"):
        want, have = encoder[key]["id"], store.attrs.get(key, {}).get("id")
        if want != have:
            raise StoreError(f"store {store.path} was encoded with {key} {have!r}, this run uses {want!r}")
    if sampling is not None:
        check_sampling_matches(store, sampling)
    stored = [str(v) for v in store.read_column("video_id")]
    listed = [str(v) for v in video_ids]
    if stored == listed:
        return
    made_from = store.attrs.get("listing", {})
    same_listing = summary is not None and all(
        made_from.get(key) == summary.get(key) for key in ("manifest", "min_duration_s", "max_duration_s"))
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


def check_sampling_matches(store: FeatureStore, sampling: dict[str, Any]) -> None:
    """Refuse to add rows whose frames are chosen otherwise than the store's (a rerun with another window)."""
    have = store.attrs.get("sampling") or {}
    keys = ("mode", "window_frames", "frames")
    if all(have.get(k) == sampling.get(k) for k in keys):
        return
    raise StoreError(
        f"store {store.path} keeps {describe_window(have)} of each video, this run asks for "
        f"{describe_window(sampling)}; rows chosen two ways would mix two experiments: use a new --store, or "
        f"--sampling {have.get('mode')}" + (f" --window-frames {have.get('window_frames')}"
                                            if have.get("mode") == "window" else "")
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

    @property
    def videos_per_s(self) -> float:
        done = self.videos_ok + self.videos_failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "videos_ok": self.videos_ok, "videos_failed": self.videos_failed,
                "videos_deferred": self.videos_deferred,
                "seconds": round(self.seconds, 3), "videos_per_s": round(self.videos_per_s, 3),
                "failed_by_reason": self.failed_by_reason}


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
        self.download_dir = config.download_dir or os.path.join(tempfile.gettempdir(), "fvlm-downloads")
        self.fetch_fn = fetch_fn or (lambda urls: fetch_sources(urls, self.download_dir))
        self.status = store.read_status()
        self.sources = store.read_column("source")

    def run(self, chunks: list[int], on_chunk: Callable[[int, EncodeReport], None] | None = None) -> EncodeReport:
        report = EncodeReport()
        started = time.perf_counter()
        device = resolve_device(self.config.device)
        encoder = FrameEncoder(self.config.encoder, device)
        threads = torch.get_num_threads()
        if device == "cpu":
            # The decode workers need the cores too: OpenMP threads that outnumber free cores spin and stall.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - self.config.decode.workers))
        todo = sum(int((self.status[self.store.chunk_rows(c)] != OK).sum()) for c in chunks)
        self.bar = progress_bar(total=todo, unit="video", desc="precompute")
        try:
            with DecodePool(self.config.decode) as pool:
                self._run(pool, encoder, chunks, report, started, on_chunk)
        finally:
            torch.set_num_threads(threads)
            self.bar.close()
        report.seconds = time.perf_counter() - started
        return report

    def _run(self, pool: DecodePool, encoder: FrameEncoder, chunks: list[int], report: EncodeReport,
             started: float, on_chunk: Callable[[int, EncodeReport], None] | None) -> None:
        ahead: deque[_ScheduledChunk] = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            ahead.append(self._schedule(pool, chunk))
            if len(ahead) >= self.config.prefetch_chunks:
                break
        while ahead:
            current = ahead.popleft()
            next_chunk = next(upcoming, None)
            if next_chunk is not None:  # keep the decoders busy while this chunk is encoded
                ahead.append(self._schedule(pool, next_chunk))
            self._finish(pool, encoder, current, report)
            report.seconds = time.perf_counter() - started
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

    def _finish(self, pool: DecodePool, encoder: FrameEncoder, item: _ScheduledChunk, report: EncodeReport) -> None:
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
        rows = self._chunk_rows(item, decoded, intervals, errors, encoder)
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

    def _chunk_rows(self, item: _ScheduledChunk, decoded: dict[int, np.ndarray], intervals: dict[int, float],
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


# ---- Prefect tasks -------------------------------------------------------------------------------------


def retry_unless_store_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures, not StoreErrors: a full disk or a read-only store needs a person first."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no exception to look at: keep the retry policy
        return True
    return not isinstance(error, StoreError)


@task(name="fetch-sources", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NONE)
def fetch_sources_task(urls: list[str], dest_dir: str) -> dict[str, dict[str, str | None]]:
    """Download one chunk's remote sources; a transient error fails the try so that Prefect retries it."""
    return fetch_sources(urls, dest_dir)


@task(name="prepare-store", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_store_error,
      cache_policy=NONE)
def prepare_store_task(path: str, listing: Listing, config: PrecomputeConfig) -> list[int]:
    """Create the store at full size (or open it) and return the chunks that still have rows to do."""
    store = prepare_store(path, listing, config)
    pending = store.pending_chunks(config.retry_failed)
    get_run_logger().info("store %s: %d of %d chunks to do (%s)", path, len(pending), store.num_chunks,
                          store.counts())
    return pending


@task(name="encode-chunks", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_store_error,
      cache_policy=NONE)
def encode_chunks_task(store_path: str, chunks: list[int], config: PrecomputeConfig) -> dict[str, Any]:
    """Decode, encode, write and commit chunks of rows, with a progress artifact while it runs."""
    logger = get_run_logger()
    progress = create_progress_artifact(progress=0.0, description=f"precompute of {len(chunks)} chunks of {store_path}")
    dest = config.download_dir or os.path.join(tempfile.gettempdir(), "fvlm-downloads")

    def on_chunk(chunk: int, report: EncodeReport) -> None:
        update_progress_artifact(progress, progress=100.0 * report.chunks / max(1, len(chunks)))
        logger.info("chunk %d committed | %d ok | %d failed | %.2f videos/s",
                    chunk, report.videos_ok, report.videos_failed, report.videos_per_s)

    report = encode_chunks(store_path, chunks, config,
                           fetch_fn=lambda urls: fetch_sources_task(urls, dest), on_chunk=on_chunk)
    update_progress_artifact(progress, progress=100.0)
    return report.as_dict()


def precompute_table(info: dict[str, Any], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the final table: kept, dropped by reason, ok, failed by reason, bytes per video, videos/s."""
    listing = info.get("listing", {})
    rows: list[dict[str, Any]] = [
        {"metric": "listed rows", "value": listing.get("rows")},
        {"metric": "kept", "value": listing.get("kept")},
    ]
    rows += [{"metric": f"dropped: {reason}", "value": n} for reason, n in listing.get("dropped", {}).items() if n]
    rows += [{"metric": "ok", "value": info["ok"]}, {"metric": "failed", "value": info["failed"]},
             {"metric": "pending", "value": info["pending"]}]
    rows += [{"metric": f"failed: {reason}", "value": n} for reason, n in info["failed_by_reason"].items()]
    per_video = info["sizes"]["disk_bytes_per_ok_video"]
    rows.append({"metric": "bytes per ok video", "value": round(per_video) if per_video else None})
    rows.append({"metric": "frames kept", "value": describe_window(info.get("sampling") or {})})
    rows.append({"metric": "median seconds between stored frames", "value": info["frame_interval"]["median_s"]})
    seconds = sum(r["seconds"] for r in reports)
    done = sum(r["videos_ok"] + r["videos_failed"] for r in reports)
    rows.append({"metric": "videos/s (this run)", "value": round(done / seconds, 3) if seconds else None})
    return rows


@task(name="report-store", cache_policy=NONE)
def report_store_task(store_path: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise the store in a table artifact; returns the store's info."""
    info = FeatureStore.open(store_path).info()
    create_table_artifact(
        key="precompute-report", table=precompute_table(info, reports),
        description=f"Precompute of {store_path}: {info['ok']} ok, {info['failed']} failed, {info['pending']} pending",
    )
    return info
