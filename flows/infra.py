"""The Prefect side of GPU hosts: a process work pool with one work queue per GPU, the zombie-run automation,
and the deployments' pull step.

`fvlm prefect setup [--gpus N] [--pool NAME]` runs `setup_prefect` against the server at PREFECT_API_URL. It is
idempotent: a second run updates the pool's job template and the automation in place and creates only what is
missing, so it is safe to run on every deploy.

How runs find their GPU: one process worker per GPU polls its own queue `gpu-<i>`. A process worker hands its own
environment to every flow run it starts, and a run's `env` job variable goes on top of it, so a run sent to queue
`gpu-<i>` carries `CUDA_VISIBLE_DEVICES=<i>` in its job variables (`gpu_job_variables`), and the worker of that
queue is started with the same value. GPU indices are those of the host, so several hosts can serve the same
queues.

Why an automation: flow retries do not cover a run that died together with its worker (a machine lost, a
container evicted): nobody reports its end, so it stays Running and the training chain stops there. A running
flow sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; the automation marks a run Crashed
when its heartbeats stop without a final state (Prefect's "detect zombie flows" recipe); the next nightly run of
the training deployment then continues from the latest checkpoint.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL
from prefect.workers.process import ProcessWorker
from pydantic import BaseModel, Field, model_validator

log = logging.getLogger(__name__)

FINAL_FLOW_RUN_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


class PrefectSetupError(RuntimeError):
    """The server or a worker is not set up as the project needs; the message says what to change."""


class InfraConfig(BaseModel):
    """What `fvlm prefect setup` creates on the server."""

    pool: str = Field("fvlm-gpu", min_length=1, description="name of the process work pool of the GPU hosts")
    gpus: int = Field(1, ge=1, le=64, description="work queues gpu-0 .. gpu-(N-1), one per GPU of a host")
    heartbeat_seconds: int = Field(30, ge=30, description="PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the pool's runs")
    zombie_after_seconds: int = Field(90, ge=60, description="a run whose heartbeats stop for this long is "
                                                             "marked Crashed")
    tag: str = Field("fvlm", min_length=1, description="the automation watches flow runs with this tag only "
                                                       "(the tag of the project's deployments)")
    automation: str = Field("fvlm: crash zombie flow runs", description="name of the zombie-run automation")

    @model_validator(mode="after")
    def _room_for_late_heartbeats(self) -> "InfraConfig":
        if self.zombie_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"zombie_after_seconds ({self.zombie_after_seconds}) must be at least twice heartbeat_seconds "
                f"({self.heartbeat_seconds}), or a run whose heartbeat is a little late is marked Crashed"
            )
        return self


def gpu_queue(gpu: int) -> str:
    """Name of the work queue whose worker owns GPU `gpu` of its host."""
    return f"gpu-{gpu}"


def gpu_job_variables(gpu: int, heartbeat_seconds: int = 30) -> dict[str, Any]:
    """Job variables of a run meant for GPU `gpu`. The whole `env` is given: a run's env replaces the pool's."""
    return {"env": {"CUDA_VISIBLE_DEVICES": str(gpu), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds)}}


def base_job_template(config: InfraConfig) -> dict[str, Any]:
    """The process worker's default template, with heartbeats on by default in the pool's `env` job variable."""
    template = ProcessWorker.get_default_base_job_template()
    env = template["variables"]["properties"]["env"]
    env["default"] = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(config.heartbeat_seconds)}
    env["description"] = ("Environment variables of the flow run, on top of the worker's own. Runs for one GPU "
                          "set CUDA_VISIBLE_DEVICES here; keep PREFECT_FLOWS_HEARTBEAT_FREQUENCY (zombie-run "
                          "detection) when you replace it.")
    return template


def zombie_automation(config: InfraConfig) -> AutomationCore:
    """Mark a tagged flow run Crashed when a heartbeat is not followed by another one, or by a final state."""
    return AutomationCore(
        name=config.automation,
        description=(f"Flow runs tagged {config.tag!r} whose heartbeats stop for {config.zombie_after_seconds} s "
                     f"without a final state are marked Crashed (made by `fvlm prefect setup`)."),
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL_FLOW_RUN_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Heartbeats of every run on the server come here (Prefect sends them by default, some as rarely as
            # every 180 s): watch only the project's runs, whose heartbeat frequency this pool sets.
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{config.tag}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=config.zombie_after_seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {config.zombie_after_seconds} s: the run's process is gone",
        )],
    )


def enter_project_dir(variable: str = "FVLM_PROJECT_DIR") -> dict[str, str]:
    """Pull step of the deployments: enter the project folder that the worker's environment names.

    Read when the run starts, on the worker, so that hosts may keep the project in different folders (a
    `{{ $VAR }}` template in prefect.yaml would be filled in by `prefect deploy` whenever the deploying shell
    has the variable).
    """
    folder = os.environ.get(variable)
    if not folder:
        raise PrefectSetupError(f"{variable} is not set on this worker: start it with {variable}=<the fvlm project "
                                f"folder> (the one holding prefect.yaml)")
    path = Path(folder).expanduser().resolve()
    if not (path / "prefect.yaml").is_file():
        raise PrefectSetupError(f"{variable}={folder} is not the fvlm project folder (no prefect.yaml in {path})")
    os.chdir(path)
    return {"directory": str(path)}


# ---- the setup -----------------------------------------------------------------------------------------


def setup_prefect(config: InfraConfig) -> dict[str, Any]:
    """Create or update the work pool, its GPU queues and the zombie automation; returns what was done."""
    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise PrefectSetupError("PREFECT_API_URL is not set: point it at your server, e.g. "
                                "PREFECT_API_URL=http://127.0.0.1:4200/api (start one with `prefect server start`)")
    try:
        with get_client(sync_client=True) as client:
            pool_created = ensure_pool(client, config)
            queues_created = ensure_queues(client, config)
            automation_id, automation_created = ensure_automation(client, config)
    except httpx.ConnectError as err:
        raise PrefectSetupError(f"cannot reach the Prefect API at {api_url} ({err}): start the server or fix "
                                f"PREFECT_API_URL") from None
    except PrefectHTTPStatusError as err:
        if err.response.status_code != 401:
            raise
        raise PrefectSetupError(f"the Prefect API at {api_url} refused the request (401 Unauthorized): set "
                                "PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING") from None
    return {
        "api_url": api_url, "pool": config.pool, "pool_created": pool_created,
        "queues": [gpu_queue(i) for i in range(config.gpus)], "queues_created": queues_created,
        "automation": config.automation, "automation_id": str(automation_id),
        "automation_created": automation_created,
    }


def ensure_pool(client: SyncPrefectClient, config: InfraConfig) -> bool:
    """The process pool with heartbeats in its env job variable. True when it was created now."""
    template = base_job_template(config)
    description = "GPU hosts: one process worker per GPU, each polling its queue gpu-<i> (fvlm prefect setup)"
    try:
        pool = client.read_work_pool(config.pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=config.pool, type="process", base_job_template=template,
                                               description=description))
        log.info("created work pool %s", config.pool)
        return True
    if pool.type != "process":
        raise PrefectSetupError(f"work pool {config.pool!r} exists with type {pool.type!r}, not 'process': "
                                f"use another --pool or delete it (prefect work-pool delete {config.pool})")
    client.update_work_pool(config.pool, WorkPoolUpdate(base_job_template=template, description=description))
    log.info("updated work pool %s", config.pool)
    return False


def ensure_queues(client: SyncPrefectClient, config: InfraConfig) -> list[str]:
    """One queue per GPU (queues of GPUs beyond --gpus are left as they are). Returns the queues created now."""
    existing = {q.name: q for q in client.read_work_queues(work_pool_name=config.pool)}
    created = []
    for gpu in range(config.gpus):
        name = gpu_queue(gpu)
        description = f"runs for GPU {gpu}: its worker runs with CUDA_VISIBLE_DEVICES={gpu}"
        if name in existing:
            client.update_work_queue(existing[name].id, description=description)
            continue
        client.create_work_queue(name=name, description=description, work_pool_name=config.pool)
        created.append(name)
    extra = sorted(set(existing) - {gpu_queue(i) for i in range(config.gpus)} - {"default"})
    if extra:
        log.info("work pool %s also has queues %s (left as they are)", config.pool, extra)
    return created


def ensure_automation(client: SyncPrefectClient, config: InfraConfig) -> tuple[UUID, bool]:
    """Create the zombie automation, or update the one of that name. Returns (id, created now)."""
    automation = zombie_automation(config)
    same_name = client.read_automations_by_name(config.automation)
    if not same_name:
        return client.create_automation(automation), True
    keep, *duplicates = sorted(same_name, key=lambda a: str(a.id))
    client.update_automation(keep.id, automation)
    for extra in duplicates:  # left by a setup that raced with another one
        client.delete_automation(extra.id)
    return keep.id, False


def format_setup(result: dict[str, Any]) -> str:
    """The summary `fvlm prefect setup` prints."""
    def made(created: bool) -> str:
        return "created" if created else "updated"

    new_queues = set(result["queues_created"])
    queues = ", ".join(f"{q} ({made(q in new_queues)})" for q in result["queues"])
    return "\n".join([
        f"server     {result['api_url']}",
        f"work pool  {result['pool']} (process, {made(result['pool_created'])})",
        f"queues     {queues}",
        f"automation {result['automation']} ({made(result['automation_created'])})",
        f"workers    one per GPU: CUDA_VISIBLE_DEVICES=<i> prefect worker start --type process "
        f"--pool {result['pool']} --work-queue gpu-<i>",
    ])
