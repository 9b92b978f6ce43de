"""The Prefect tasks of a precompute: prepare the store, encode chunks (fetching remote sources as a retried task
of its own), report. Each wraps the plain functions of tasks/precompute.py."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE

from storage.store import FeatureStore, StoreError
from tasks.download import DownloadError, download_folder
from tasks.listing import Listing
from tasks.precompute import EncodeReport, PrecomputeConfig, encode_chunks, fetch_sources, precompute_table, prepare_store
from tasks.precompute_report import precompute_markdown
from tasks.runtime import retry_unless

retry_unless_store_error = retry_unless(StoreError)


FETCH_RETRIES = 3


@task(name="fetch-sources", retries=FETCH_RETRIES, retry_delay_seconds=[2, 10, 30], cache_policy=NONE)
def fetch_sources_task(urls: list[str], dest_dir: str) -> dict[str, Any]:
    """Download one chunk's remote sources; a transient error fails the try so that Prefect retries it.
    Returns {"files": what fetch_sources returns, "tries": how many tries it took}."""
    return {"files": fetch_sources(urls, dest_dir), "tries": runtime.task_run.run_count}


class CountedFetch:
    """fetch_sources_task as encode_chunks' fetch function, counting the retries it took."""

    def __init__(self, dest_dir: str):
        self.dest_dir = dest_dir
        self.retries = 0

    def __call__(self, urls: list[str]) -> dict[str, dict[str, str | None]]:
        try:
            fetched = fetch_sources_task(urls, self.dest_dir)
        except DownloadError:
            self.retries += FETCH_RETRIES  # every retry was used, and failed
            raise
        self.retries += fetched["tries"] - 1
        return fetched["files"]


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
    progress = create_progress_artifact(progress=0.0, description=f"Precompute of {store_path}: {len(chunks)} chunks "
                                                                  f"to encode, none committed yet")
    fetch = CountedFetch(str(download_folder(config.download_dir)))

    def on_chunk(chunk: int, report: EncodeReport) -> None:
        update_progress_artifact(progress, progress=100.0 * report.chunks / max(1, len(chunks)),
                                 description=f"Precompute of {store_path}: {report.chunks} of {len(chunks)} chunks "
                                             f"committed, {report.videos_ok} ok, {report.videos_failed} failed, "
                                             f"{report.videos_per_s:.2f} videos/s, {fetch.retries} download retries")
        logger.info("chunk %d committed | %d ok | %d failed | %.2f videos/s",
                    chunk, report.videos_ok, report.videos_failed, report.videos_per_s)

    report = encode_chunks(store_path, chunks, config, fetch_fn=fetch, on_chunk=on_chunk)
    update_progress_artifact(progress, progress=100.0)
    return {**report.as_dict(), "fetch_retries": fetch.retries}


@task(name="report-store", cache_policy=NONE)
def report_store_task(store_path: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise the store: the `precompute-report` table, and `precompute-overview` (throughput over the run and
    sample frames of what the store holds); returns the store's info."""
    info = FeatureStore.open(store_path).info()
    create_table_artifact(
        key="precompute-report", table=precompute_table(info, reports),
        description=f"Precompute of {store_path}: {info['ok']} ok, {info['failed']} failed, {info['pending']} pending",
    )
    markdown, description = precompute_markdown(store_path, info, reports)
    create_markdown_artifact(key="precompute-overview", markdown=markdown, description=description)
    return info
