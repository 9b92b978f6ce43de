"""What the training chain needs to be run and stopped from the Prefect UI: the training config from a preset and a
few overrides (the deployment's run form), the chain's idempotency keys, and the cancelling of chunks that wait for
the deployment's slot when a chunk is cancelled.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from model.presets import merge_values
from storage.run_folder import RunFolder
from tasks.train_config import TrainConfig


class TrainOverrideError(ValueError):
    """The `train` overrides do not fit the preset or name settings that do not exist."""


def unknown_settings(model: type[BaseModel], values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys of `values` (nested ones as `loader.batch_size`) that are no field of `model`: pydantic would
    ignore them, and a misspelt override would silently do nothing."""
    unknown = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(prefix + key)
        elif isinstance(value, Mapping) and isinstance(field.annotation, type) and \
                issubclass(field.annotation, BaseModel):
            unknown += unknown_settings(field.annotation, value, f"{prefix}{key}.")
    return unknown


def train_config(preset: str, overrides: Mapping[str, Any] | None = None, *, batch_size: int | None = None,
                 lr: float | None = None, max_minutes: float | None = None,
                 nproc: int | None = None) -> TrainConfig:
    """The preset's training config, `overrides` over it (a dict merges into a nested config: {"loader":
    {"num_workers": 2}} keeps the preset's other loader settings), the plain knobs over those."""
    overrides = dict(overrides or {})
    if overrides.get("preset", preset) != preset:
        raise TrainOverrideError(
            f"train.preset is {overrides['preset']!r} but the run's preset is {preset!r}: set preset to "
            f"{overrides['preset']!r}, or leave preset out of train")
    unknown = unknown_settings(TrainConfig, overrides)
    if unknown:
        raise TrainOverrideError(f"train names settings that do not exist: {', '.join(unknown)} "
                                 f"(the fields of TrainConfig in tasks/train_config.py)")
    knobs: dict[str, Any] = {"lr": lr, "max_minutes": max_minutes, "nproc": nproc}
    knobs = {key: value for key, value in knobs.items() if value is not None}
    if batch_size is not None:
        knobs["loader"] = {"batch_size": batch_size}
    return TrainConfig.for_preset(preset, **merge_values(overrides, knobs))


def chunk_key(run_dir: str, chunk: int) -> str:
    """Idempotency key of a chunk's flow run: the run folder's name, its chain id and the chunk number. A chunk is
    never submitted twice even if the submitting run is retried, and a folder deleted and started again is a new
    chain (a new id in chain.json), whose keys no run of the old chain holds: Prefect keeps a key per flow for
    good and would hand back the old chain's run instead of starting one."""
    folder = RunFolder(Path(run_dir).expanduser().resolve())
    return f"{chain_prefix(folder)}{chunk}"


def chain_prefix(folder: RunFolder) -> str:
    return f"{folder.path.name}-{folder.chain_id()}-chunk-"


def is_waiting_chunk(run: Any, run_dir: Path, prefix: str, now: datetime.datetime) -> bool:
    """A run of the deployment that waits for the slot and would train this run folder next: a chunk this chain
    submitted, or a run of the same folder due already (a nightly run that queued behind the cancelled chunk).
    Later nightly runs stay: they continue the chain on their night."""
    if (run.idempotency_key or "").startswith(prefix):
        return True
    folder = run.parameters.get("run_dir")
    due = run.expected_start_time is None or run.expected_start_time <= now
    return due and folder is not None and Path(folder).expanduser().resolve() == run_dir


def cancel_waiting_chunks(deployment_id: Any, flow_run_id: Any, run_dir: str) -> list[str]:
    """Cancel the runs of the deployment that wait (Scheduled, Pending: AwaitingConcurrencySlot, Late) to train
    this run folder next. Prefect does not cascade a cancel to runs started with run_deployment(timeout=0).
    Returns the names of the runs cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    folder = RunFolder(Path(run_dir).expanduser().resolve())
    prefix, now = chain_prefix(folder), datetime.datetime.now(datetime.timezone.utc)
    waiting = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.SCHEDULED, StateType.PENDING])))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=waiting, deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
        chosen = [r for r in runs if r.id != flow_run_id and is_waiting_chunk(r, folder.path, prefix, now)]
        for run in chosen:
            client.set_flow_run_state(run.id, Cancelled(message=f"the chain of {run_dir} was cancelled"), force=True)
    return [run.name for run in chosen]


@task(name="cancel-waiting-chunks", cache_policy=NONE, retries=2, retry_delay_seconds=2)
def cancel_waiting_chunks_task(deployment_id: Any, flow_run_id: Any, run_dir: str) -> list[str]:
    """Cancel the runs that wait to train this run folder next (the chain was cancelled)."""
    names = cancel_waiting_chunks(deployment_id, flow_run_id, run_dir)
    get_run_logger().info("cancelled %d waiting runs of %s: %s", len(names), run_dir, ", ".join(names) or "none")
    return names
