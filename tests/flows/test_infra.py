"""`fvlm prefect setup` against a real Prefect server (the session's test harness), the deployments' pull step,
and that prefect.yaml, docker/compose.yaml and the Dockerfile agree with what the setup creates."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.cli import main
from flows.infra import (
    InfraConfig,
    PrefectSetupError,
    base_job_template,
    enter_project_dir,
    gpu_job_variables,
    gpu_queue,
    setup_prefect,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_setup(pool: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return (client.read_work_pool(pool), {q.name: q for q in client.read_work_queues(work_pool_name=pool)},
                client.read_automations_by_name(InfraConfig().automation))


@pytest.mark.slow
def test_setup_creates_the_pool_the_gpu_queues_and_the_zombie_automation(prefect_harness, capsys):
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import Posture

    pool_name = f"gpu-{uuid.uuid4().hex[:8]}"
    assert main(["prefect", "setup", "--gpus", "2", "--pool", pool_name]) == 0
    out = capsys.readouterr().out
    assert f"work pool  {pool_name} (process, created)" in out and "gpu-1 (created)" in out

    pool, queues, automations = read_setup(pool_name)
    assert pool.type == "process"
    env = pool.base_job_template["variables"]["properties"]["env"]
    assert env["default"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    assert pool.base_job_template["job_configuration"]["env"] == "{{ env }}"
    assert {"gpu-0", "gpu-1"} <= set(queues) and "gpu-2" not in queues
    assert "CUDA_VISIBLE_DEVICES=1" in queues["gpu-1"].description

    (automation,) = automations
    trigger = automation.trigger
    assert automation.enabled and trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                              "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    assert trigger.for_each == {"prefect.resource.id"} and trigger.within == timedelta(seconds=90)
    assert trigger.match_related.get("prefect.resource.id") == ["prefect.tag.fvlm"]
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == StateType.CRASHED


@pytest.mark.slow
def test_setup_twice_is_harmless_and_takes_new_settings(prefect_harness, capsys):
    pool_name = f"gpu-{uuid.uuid4().hex[:8]}"
    first = setup_prefect(InfraConfig(pool=pool_name, gpus=2))
    assert first["pool_created"] and first["queues_created"] == ["gpu-0", "gpu-1"]
    pool, queues, automations = read_setup(pool_name)

    again = setup_prefect(InfraConfig(pool=pool_name, gpus=2))
    assert not again["pool_created"] and again["queues_created"] == [] and not again["automation_created"]
    assert again["automation_id"] == first["automation_id"] == str(automations[0].id)

    assert main(["prefect", "setup", "--gpus", "3", "--pool", pool_name, "--heartbeat-seconds", "45",
                 "--zombie-after", "135"]) == 0
    assert "gpu-2 (created)" in capsys.readouterr().out
    pool_after, queues_after, automations_after = read_setup(pool_name)
    assert pool_after.id == pool.id
    assert {name: q.id for name, q in queues_after.items() if name in queues} == \
        {name: q.id for name, q in queues.items()}
    assert set(queues_after) - set(queues) == {"gpu-2"}
    assert pool_after.base_job_template["variables"]["properties"]["env"]["default"] == \
        {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45"}
    assert len(automations_after) == 1 and automations_after[0].id == automations[0].id
    assert automations_after[0].trigger.within == timedelta(seconds=135)


@pytest.mark.slow
def test_setup_refuses_a_pool_of_another_type(prefect_harness, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool_name = f"k8s-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool_name, type="kubernetes"))
    assert main(["prefect", "setup", "--pool", pool_name]) == 2
    assert "type 'kubernetes', not 'process'" in caplog.text and "use another --pool" in caplog.text


def test_setup_without_an_api_url_says_what_to_set():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(PrefectSetupError, match="PREFECT_API_URL is not set"):
            setup_prefect(InfraConfig())


def test_a_zombie_window_shorter_than_two_heartbeats_is_refused(caplog):
    with pytest.raises(ValidationError, match="at least twice heartbeat_seconds"):
        InfraConfig(heartbeat_seconds=60, zombie_after_seconds=90)
    assert main(["prefect", "setup", "--heartbeat-seconds", "60", "--zombie-after", "90"]) == 2
    assert "at least twice" in caplog.text


def test_gpu_job_variables_pass_the_pools_job_template():
    from prefect.utilities.schema_tools import validate

    template = base_job_template(InfraConfig())
    variables = gpu_job_variables(1)
    validate(variables, template["variables"], raise_on_error=True)
    assert gpu_queue(1) == "gpu-1" and variables["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    # a run's env replaces the pool's default, so the run's own env keeps the heartbeat
    assert variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == template["variables"]["properties"]["env"][
        "default"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]


def test_pull_step_enters_the_project_folder_named_by_the_worker(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FVLM_PROJECT_DIR", raising=False)
    with pytest.raises(PrefectSetupError, match="FVLM_PROJECT_DIR is not set on this worker"):
        enter_project_dir()
    monkeypatch.setenv("FVLM_PROJECT_DIR", str(tmp_path))
    with pytest.raises(PrefectSetupError, match="no prefect.yaml"):
        enter_project_dir()
    monkeypatch.setenv("FVLM_PROJECT_DIR", str(REPO_ROOT))
    assert enter_project_dir() == {"directory": str(REPO_ROOT)}
    assert Path.cwd() == REPO_ROOT


# ---- the files agree with the setup -------------------------------------------------------------------


def test_every_deployment_goes_to_the_setup_pool_with_the_watched_tag():
    config = InfraConfig()
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    assert spec["pull"] == [{"flows.infra.enter_project_dir": {"variable": "FVLM_PROJECT_DIR"}}]
    names = set()
    for d in spec["deployments"]:
        names.add(d["name"])
        assert d["work_pool"]["name"] == config.pool and d["work_pool"]["work_queue_name"] == gpu_queue(0)
        assert d["work_pool"]["job_variables"] == gpu_job_variables(0, config.heartbeat_seconds), d["name"]
        assert config.tag in d["tags"] and d["enforce_parameter_schema"], d["name"]
        path, name = d["entrypoint"].split(":")
        assert (REPO_ROOT / path).is_file() and f"def {name}(" in (REPO_ROOT / path).read_text()
    assert names == {"precompute", "precompute-chunks", "train", "demo"}
    # the precompute flow hands its chunks to this deployment by default
    from flows.precompute import ScaleOut

    assert ScaleOut().deployment == "precompute-chunks/precompute-chunks"


def test_compose_runs_one_worker_per_gpu_queue_on_postgres():
    config = InfraConfig()
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert len(workers) == 2 and f"--gpus ${{FVLM_GPUS:-{len(workers)}}}" in services["setup"]["command"][-1]
    for name, service in workers.items():
        gpu = int(name.removeprefix("worker-gpu"))
        command = service["command"]
        assert command[command.index("--pool") + 1] == config.pool
        assert command[command.index("--work-queue") + 1] == gpu_queue(gpu)
        assert service["environment"]["CUDA_VISIBLE_DEVICES"] == str(gpu)
        assert int(re.fullmatch(r"(\d+)gb", service["shm_size"]).group(1)) >= 2
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["postgres"]["image"].startswith("postgres:")


def test_compose_has_no_default_secret_and_binds_to_loopback():
    text = (REPO_ROOT / "docker" / "compose.yaml").read_text()
    uses = re.findall(r"\$\{(POSTGRES_PASSWORD|PREFECT_API_AUTH_STRING)([^}]*)\}", text)
    assert {name for name, _ in uses} == {"POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING"}
    assert all(rest.startswith(":?") for _, rest in uses), uses  # compose refuses to start without them
    services = yaml.safe_load(text)["services"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    for name in [n for n in services if n.startswith("worker-gpu")] + ["setup"]:
        environment = services[name]["environment"]
        assert "PREFECT_API_AUTH_STRING" in environment, name
    (port,) = services["prefect-server"]["ports"]
    assert port.startswith("${FVLM_SERVER_PUBLISH:-127.0.0.1:4200}")


def test_worker_image_sets_the_project_folder_and_heartbeats():
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"FVLM_PROJECT_DIR=/opt/fvlm\b", dockerfile) and "WORKDIR /opt/fvlm" in dockerfile
    frequency = int(re.search(r"PREFECT_FLOWS_HEARTBEAT_FREQUENCY=(\d+)", dockerfile).group(1))
    assert 30 <= frequency and 2 * frequency <= InfraConfig().zombie_after_seconds
    assert "COPY README.md prefect.yaml ./" in dockerfile  # enter_project_dir looks for prefect.yaml
    assert "uv venv --python 3.11" in dockerfile and "--index-url" in dockerfile
