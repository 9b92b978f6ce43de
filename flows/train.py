"""The training chain: timed chunks that resubmit themselves from the latest checkpoint until the ratio converges.

Run from a deployment, a chunk that does not stop submits the next chunk as a new flow run of its own
deployment (the deployment's concurrency limit of 1 queues it behind this one) and returns. Run from the
command line, the same flow loops in this process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, runtime
from prefect.deployments import run_deployment
from pydantic import Field

from tasks.chain import attention_pictures_task, decide_task, report_chunks_task, train_chunk_task
from tasks.convergence import ConvergenceConfig
from tasks.runtime import send_logs_to_prefect
from tasks.training import TrainConfig

send_logs_to_prefect()


def chunk_key(run_dir: str, chunk: int) -> str:
    """Idempotency key of a chunk's flow run: the run folder and the chunk number, so a chunk is never
    submitted twice even if the submitting run is retried."""
    folder = Path(run_dir).expanduser().resolve()
    return f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}-chunk-{chunk}"


def resolve_configs(preset: Literal["demo", "full"], train: TrainConfig | None,
                    convergence: ConvergenceConfig | None, max_minutes: float | None,
                    max_chunks: int | None) -> tuple[TrainConfig, ConvergenceConfig]:
    """The preset's defaults, the given configs over them, then the two budget flags over those."""
    config = train or TrainConfig.for_preset(preset)
    if max_minutes is not None:
        config = config.model_copy(update={"max_minutes": max_minutes})
    rule = convergence or ConvergenceConfig.for_preset(preset)
    if max_chunks is not None:
        rule = rule.model_copy(update={"max_chunks": max_chunks})
    return config, rule


@flow(name="train", log_prints=False)
def train_flow(
    store: str,
    run_dir: str,
    preset: Literal["demo", "full"] = "full",
    max_minutes: Annotated[float | None, Field(gt=0)] = None,
    max_chunks: Annotated[int | None, Field(ge=1)] = None,
    resume: str | None = None,
    train: TrainConfig | None = None,
    convergence: ConvergenceConfig | None = None,
) -> dict[str, Any]:
    """Train timed chunks from the latest checkpoint in run_dir until the held-out ratio converges.

    Args:
        store: feature store made by the precompute flow (path or fsspec URL reachable from the worker)
        run_dir: run folder: checkpoints, history.jsonl, state.json, attention pictures, wandb files
        preset: full: the seed recipe with SmolLM2-135M; demo: a tiny model that trains on a CPU
        max_minutes: wall-clock budget of one chunk (default: the preset's, 120 for full)
        max_chunks: stop once the run folder has this many chunks, earlier runs included (default: 12)
        resume: start the first chunk from this checkpoint file instead of the folder's latest
        train: the whole training config (default: the preset's); max_minutes overrides its budget
        convergence: when the chain stops (default: the preset's); max_chunks overrides its chunk budget
    """
    logger = get_run_logger()
    config, rule = resolve_configs(preset, train, convergence, max_minutes, max_chunks)
    decision = decide_task(run_dir, rule)
    if decision["done"]:  # e.g. the nightly schedule after convergence: record it and do nothing
        logger.info("run %s is already done (%s): nothing to train", run_dir, decision["reason"])
        report_chunks_task(run_dir, decision, config)
        return {**decision, "already_done": True}
    while True:
        result = train_chunk_task(store, run_dir, config, resume)
        resume = None
        draw_pictures(store, run_dir, config)
        decision = decide_task(run_dir, rule)
        report_chunks_task(run_dir, decision, config)
        if decision["done"]:
            return {**decision, "last_chunk": result}
        if runtime.deployment.id is not None:
            submit_next_chunk(run_dir, decision["chunks_done"] + 1)
            return {**decision, "last_chunk": result, "next_chunk_submitted": True}


def draw_pictures(store: str, run_dir: str, config: TrainConfig) -> None:
    """The chunk's attention pictures, as their own task: a picture that cannot be drawn is a warning in the
    flow's log and a failed task run in the UI, never a stopped chain."""
    state = attention_pictures_task(store, run_dir, config, return_state=True)
    if state.is_failed():
        get_run_logger().warning("no attention pictures for this chunk: %s", state.message)


def submit_next_chunk(run_dir: str, chunk: int) -> None:
    """A new flow run of this deployment with the same parameters; it waits behind this run (limit 1)."""
    name = f"{runtime.flow_run.flow_name}/{runtime.deployment.name}"
    parameters = dict(runtime.flow_run.parameters)
    parameters["resume"] = None
    run = run_deployment(name=name, parameters=parameters, timeout=0, as_subflow=False,
                         idempotency_key=chunk_key(run_dir, chunk))
    get_run_logger().info("submitted chunk %d of %s as flow run %s", chunk, run_dir, run.name)
