"""Precompute flows: list videos, create the store, fill its chunks (here or on worker deployments), report."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import BaseModel, Field

from flows.infra import gpu_job_variables, gpu_queue
from model.encoders import EncoderConfig
from storage.store import StoreConfig
from tasks.decode import DecodeConfig
from tasks.listing import ListingConfig, list_videos_task
from tasks.precompute import PrecomputeConfig, split_chunks, store_counts
from tasks.precompute_tasks import encode_chunks_task, prepare_store_task, report_store_task
from tasks.runtime import send_logs_to_prefect

send_logs_to_prefect()


class ScaleOut(BaseModel):
    """Hand chunk-aligned row ranges of the store to runs of a worker deployment (several GPUs or hosts)."""

    workers: int = Field(1, ge=1, le=256, description="parallel runs; 1 fills the store in this run")
    deployment: str = Field(
        "precompute-chunks/precompute-chunks",
        description="'flow/deployment' name of the worker deployment that fills a range of chunks",
    )
    timeout_hours: float = Field(48.0, gt=0, description="how long to wait for the worker runs")
    gpus: int = Field(
        0, ge=0, le=64,
        description="spread the worker runs over the GPU work queues: run k goes to queue gpu-(k mod gpus) with "
                    "CUDA_VISIBLE_DEVICES=k mod gpus (see `fvlm prefect setup`); 0: the worker deployment's queue",
    )


@flow(name="precompute-chunks", log_prints=False)
def precompute_chunks_flow(store: str, chunks: list[int], config: PrecomputeConfig = PrecomputeConfig()) -> dict:
    """Fill the given chunks of an existing store (the worker side of a scaled-out precompute).

    Args:
        store: path or fsspec URL of a store made by the precompute flow, reachable from this worker
        chunks: store chunks this run owns (whole, chunk-aligned row ranges: no other run writes them)
        config: encoders, decoding and device, as the precompute flow resolved them
    """
    return encode_chunks_task(store, chunks, config)


@flow(name="precompute", log_prints=False)
def precompute_flow(
    manifest: str,
    store: str,
    encoder: EncoderConfig = EncoderConfig(),
    listing: ListingConfig = ListingConfig(),
    decode: DecodeConfig = DecodeConfig(),
    layout: StoreConfig = StoreConfig(),
    device: str = PrecomputeConfig.model_fields["device"].default,
    scale_out: ScaleOut = ScaleOut(),
) -> dict[str, Any]:
    """Manifest -> 20-60 s filter -> decoded frames -> DINOv2 + VAE features -> chunked Zarr store.

    Args:
        manifest: CSV / Parquet / JSON-lines manifest (WebVid columns accepted), or a folder of videos; a relative
            path is relative to the worker's project folder
        store: feature store to create or complete (a Zarr group: local path or fsspec URL)
        encoder: DINOv2 and SD-VAE to run (preset full: hub ids or local folders; demo: tiny random encoders)
        listing: which manifest rows are kept (duration bounds, captions, limit)
        decode: frame sampling and the decode worker processes
        layout: chunking of a new store (an existing store keeps its own)
        device: encoder device: auto (cuda when present), cpu, cuda, cuda:1, ...
        scale_out: hand ranges of chunks to runs of a worker deployment (several GPUs or hosts)
    """
    config = PrecomputeConfig(encoder=encoder, decode=decode, layout=layout, device=device)
    listed = list_videos_task(manifest, listing)
    pending = prepare_store_task(store, listed, config)
    if scale_out.workers > 1 and len(pending) > 1:
        reports = run_workers(store, pending, config, scale_out)
    elif pending:
        reports = [encode_chunks_task(store, pending, config)]
    else:
        get_run_logger().info("store %s is complete: nothing to do", store)
        reports = []
    return report_store_task(store, reports)


def run_workers(store: str, pending: list[int], config: PrecomputeConfig, scale_out: ScaleOut) -> list[dict]:
    """Start one worker run per range of chunks, wait for all, and fail if any of them failed."""
    logger = get_run_logger()
    started = time.monotonic()
    before = store_counts(store)
    if "://" not in store:  # the worker runs may start in another folder
        store = str(Path(store).resolve())
    runs = []
    for k, part in enumerate(split_chunks(pending, scale_out.workers)):
        routing: dict[str, Any] = {}
        if scale_out.gpus:
            gpu = k % scale_out.gpus
            routing = {"work_queue_name": gpu_queue(gpu), "job_variables": gpu_job_variables(gpu)}
        run = run_deployment(
            scale_out.deployment,
            parameters={"store": store, "chunks": part, "config": config.model_dump(mode="json")},
            timeout=0, as_subflow=True, **routing,
        )
        logger.info("chunks %d-%d of %s -> flow run %s (%s)", part[0], part[-1], store, run.name,
                    routing.get("work_queue_name", "the deployment's queue"))
        runs.append(run)
    run_coro_as_sync(wait_for_workers(runs, started + scale_out.timeout_hours * 3600, scale_out.timeout_hours))
    after = store_counts(store)
    return [{"videos_ok": after["ok"] - before["ok"], "videos_failed": after["failed"] - before["failed"],
             "seconds": time.monotonic() - started, "workers": len(runs),
             "fetch_retries": fetch_retries([run.id for run in runs])}]


def fetch_retries(flow_run_ids: list[Any]) -> int:
    """Retries of the worker runs' fetch-sources task runs, as the server recorded them."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        fetches = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)),
                                        task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="fetch-sources")))
    return sum(max(0, run.run_count - 1) for run in fetches)


async def wait_for_workers(runs: list[FlowRun], deadline: float, timeout_hours: float) -> None:
    """Wait for all worker runs at once; fail on the first that ends other than completed, or at the deadline."""
    async with get_client() as client:
        waits = {asyncio.create_task(wait_for_flow_run(run.id, timeout=None, client=client)): run for run in runs}
        pending = set(waits)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError(f"{len(pending)} worker runs still running after {timeout_hours} h")
                for finished in done:
                    state = finished.result().state
                    if not state.is_completed():
                        raise RuntimeError(f"worker run {waits[finished].name} ended {state.type.value}: "
                                           f"{state.message}; rerun the flow to finish the missing chunks")
        finally:  # stop the waits still running before their client closes
            for wait in pending:
                wait.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
