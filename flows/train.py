"""The training chain: timed chunks that resubmit themselves from the latest checkpoint until the ratio converges.

Run from a deployment, a chunk that does not stop submits the next chunk as a new flow run of its own
deployment (the deployment's concurrency limit of 1 queues it behind this one) and returns. Run from the
command line, the same flow loops in this process.

Cancelled from the UI (the process worker sends the run's process group SIGTERM, SIGKILL 30 s later), the chunk
stops at its next step, saves a checkpoint, records itself in history.jsonl as cancelled, cancels the runs that
wait to train the folder next, submits nothing and ends Cancelled; the next run continues from that checkpoint.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, runtime
from prefect.deployments import run_deployment
from prefect.states import Cancelled, State
from pydantic import BaseModel, BeforeValidator, Field

from tasks.chain import attention_pictures_task, decide_task, report_chunks_task, train_chunk_task
from tasks.chain_control import cancel_waiting_chunks_task, chunk_key, train_config
from tasks.convergence import ConvergenceConfig
from tasks.runtime import send_logs_to_prefect
from tasks.training import TrainConfig

send_logs_to_prefect()


__all__ = ["chunk_key", "train_flow"]


def as_overrides(value: Any) -> Any:
    """A whole TrainConfig (the command line, tests) is accepted as overrides: all of its values."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


# The run form shows a free-form object, not TrainConfig's ~50 fields filled with the full preset's values.
TrainOverrides = Annotated[dict[str, Any] | None, BeforeValidator(as_overrides)]


def resolve_configs(preset: Literal["demo", "full"], train: dict[str, Any] | None,
                    convergence: ConvergenceConfig | None, max_chunks: int | None,
                    **knobs: Any) -> tuple[TrainConfig, ConvergenceConfig]:
    """The preset's defaults, the given overrides over them, then the plain knobs over those."""
    config = train_config(preset, train, **knobs)
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
    batch_size: Annotated[int | None, Field(ge=1)] = None,
    lr: Annotated[float | None, Field(gt=0)] = None,
    nproc: Annotated[int | None, Field(ge=1)] = None,
    resume: str | None = None,
    train: TrainOverrides = None,
    convergence: ConvergenceConfig | None = None,
) -> dict[str, Any] | State:
    """Train timed chunks from the latest checkpoint in run_dir until the held-out ratio converges.

    Args:
        store: feature store made by the precompute flow (path or fsspec URL reachable from the worker)
        run_dir: run folder: checkpoints, history.jsonl, state.json, attention pictures, wandb files
        preset: full: the seed recipe with SmolLM2-135M; demo: a tiny model that trains on a CPU
        max_minutes: minutes of training per chunk (default: the preset's: 120 for full, 1 for demo)
        max_chunks: stop once the run folder has this many chunks, earlier runs included (default: the preset's)
        batch_size: samples per optimizer step (default: the preset's: 64 for full, 8 for demo)
        lr: peak learning rate of AdamW (default: the preset's: 1e-4 for full, 1e-3 for demo)
        nproc: processes per chunk on the worker's host, one per visible GPU (DDP); divides batch_size (default 1)
        resume: start the first chunk from this checkpoint file instead of the folder's latest
        train: advanced: TrainConfig fields over the preset's, e.g. {"loader": {"num_workers": 2}}; the knobs
            above win; a preset in it must be the run's, an unknown name is refused
        convergence: when the chain stops (default: the preset's); max_chunks overrides its chunk budget
    """
    config, rule = resolve_configs(preset, train, convergence, max_chunks, batch_size=batch_size, lr=lr,
                                   max_minutes=max_minutes, nproc=nproc)
    decision = decide_task(run_dir, rule)
    if decision["done"]:  # e.g. the nightly schedule after convergence: record it and do nothing
        get_run_logger().info("run %s is already done (%s): nothing to train", run_dir, decision["reason"])
        report_chunks_task(run_dir, decision, config, rule)
        return {**decision, "already_done": True}
    while True:
        result = train_chunk_task(store, run_dir, config, resume)
        resume = None
        if result["stopped_by"] == "cancelled":
            return stop_cancelled_chain(run_dir, rule, result)
        draw_pictures(store, run_dir, config)
        decision = decide_task(run_dir, rule)
        report_chunks_task(run_dir, decision, config, rule,  # progress after each chunk, the markdown after the last
                           final=decision["done"] or runtime.deployment.id is not None)
        if decision["done"]:
            return {**decision, "last_chunk": result}
        if runtime.deployment.id is not None:
            submit_next_chunk(run_dir, decision["chunks_done"] + 1)
            return {**decision, "last_chunk": result, "next_chunk_submitted": True}


def stop_cancelled_chain(run_dir: str, rule: ConvergenceConfig, result: dict[str, Any]) -> dict[str, Any] | State:
    """The chunk was stopped by SIGTERM (a cancel in the UI) and is checkpointed and recorded: submit nothing,
    cancel the runs that wait to train this folder next, and end Cancelled (from the command line: return)."""
    decision = decide_task(run_dir, rule)
    message = (f"cancelled: chunk {result['chunk']} stopped at step {result['step']} and saved "
               f"{result['checkpoint']}; a new run of {run_dir} continues from there")
    get_run_logger().warning(message)
    if runtime.deployment.id is None:
        return {**decision, "done": True, "reason": message, "cancelled": True, "last_chunk": result}
    cancel_waiting_chunks_task(runtime.deployment.id, runtime.flow_run.id, run_dir)
    return Cancelled(message=message)


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
