"""Several hosts, safely: a `prefect server start` with basic auth (PREFECT_SERVER_API_AUTH_STRING), as the compose
file runs it. A client without the string, or with a wrong one, is refused with 401; `fvlm prefect setup`, a
`fvlm train` run, `prefect deploy` and a process worker with PREFECT_API_AUTH_STRING work; the string appears in
no output, log, artifact, event, flow run, run folder or server database.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.flows.test_deployments import REPO_ROOT, PrefectServer, Service, tiny_train_config, wait_until
from tests.tasks.test_training import make_tiny_store

pytestmark = pytest.mark.slow

POOL = "fvlm-gpu"
AUTH_STRING = f"fvlm-admin:{uuid.uuid4().hex}"  # user:password, new for every session
AUTH_TOKEN = base64.b64encode(AUTH_STRING.encode()).decode()  # what the Authorization header carries


class AuthServer(PrefectServer):
    """The tests' Prefect server with an auth string: the server gets PREFECT_SERVER_API_AUTH_STRING only, every
    client and worker PREFECT_API_AUTH_STRING."""

    def __init__(self, root: Path, auth_string: str):
        super().__init__(root)
        self.auth_string = auth_string
        self.client_env["PREFECT_API_AUTH_STRING"] = auth_string

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        if name == "server":
            env = {k: v for k, v in (env or self.client_env).items() if k != "PREFECT_API_AUTH_STRING"}
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string
        return super().spawn(name, args, env)

    def client(self, auth_string: str | None = None):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url, auth_string=auth_string or self.auth_string)

    def env_without_string(self) -> dict[str, str]:
        return {k: v for k, v in self.client_env.items() if "AUTH_STRING" not in k}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = AuthServer(tmp_path_factory.mktemp("auth-server"), AUTH_STRING)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def start(server: AuthServer, name: str, args: list[str]) -> Service:
    """A client command from the repository root (where prefect.yaml is), its output in ROOT/<name>.log."""
    service = Service(name, args, server.client_env, server.root, cwd=REPO_ROOT)
    server.services.append(service)
    return service


def finish(service: Service, timeout_s: float) -> str:
    """Wait for a command started with `start`; its output, after asserting it succeeded."""
    code = service.proc.wait(timeout=timeout_s)
    assert code == 0, service.tail(6000)
    return service.log.read_text(errors="replace")


def fvlm_train_args(store: str, run_dir: Path) -> list[str]:
    """One 4-step training chunk of tests/tasks/test_training.py's tiny model, from the command line."""
    return [sys.executable, "-m", "flows.cli", "train", "--store", store, "--run-dir", str(run_dir),
            "--preset", "demo", "--max-chunks", "1", "--device", "cpu", "--wandb", "disabled", "--batch-size", "4",
            "--train.model.feature-dim", "8", "--train.model.num-tokens", "5", "--train.model.query-dim", "8",
            "--train.model.latent-size", "4", "--train.model.head-hidden", "16",
            "--train.model.head-channels", "4", "8", "8", "--train.max-steps-per-chunk", "4",
            "--train.eval-batches", "1", "--train.attention-videos", "0", "--train.loader.num-workers", "0",
            "--train.loader.buffer-chunks", "2", "--train.loader.eval-fraction", "0.25"]


@pytest.fixture(scope="module")
def runs(server):
    """With the string: setup, then a worker, `prefect deploy` and a `fvlm train` at once (two cores), then a run
    of the train deployment on that worker. Returns the worker run's id and final state and the CLI's output."""
    from tasks.convergence import ConvergenceConfig

    started = time.monotonic()
    store = make_tiny_store(server.root / "tiny.zarr", videos=8)
    finish(start(server, "fvlm-setup", [sys.executable, "-m", "flows.cli", "prefect", "setup", "--gpus", "1",
                                        "--pool", POOL]), 120)
    worker_env = dict(server.client_env, CUDA_VISIBLE_DEVICES="0", PREFECT_WORKER_QUERY_SECONDS="1")
    server.spawn("worker-gpu0", [sys.executable, "-m", "prefect", "worker", "start", "--type", "process",
                                 "--pool", POOL, "--work-queue", "gpu-0", "--name", "auth-gpu0"], worker_env)
    deploy = start(server, "prefect-deploy", [sys.executable, "-m", "prefect", "--no-prompt", "deploy",
                                              "--name", "train"])
    cli = start(server, "fvlm-train", fvlm_train_args(store, server.root / "run-cli"))
    finish(deploy, 180)
    parameters = {"store": store, "run_dir": str(server.root / "run-worker"), "preset": "demo",
                  "train": tiny_train_config(),
                  "convergence": ConvergenceConfig(min_steps=10**6, window=2, max_chunks=1).model_dump(mode="json")}
    with server.client() as client:
        run = client.create_flow_run_from_deployment(client.read_deployment_by_name("train/train").id,
                                                     parameters=parameters)

        def final():
            state = client.read_flow_run(run.id).state
            return state if state is not None and state.is_final() else None

        state = wait_until(final, 240, "the worker's run of train/train", lambda: server.logs(client, [run.id]))
        cli_output = finish(cli, 240)
    seconds = time.monotonic() - started
    print(f"setup, deploy, fvlm train and a worker run with auth: {seconds:.1f} s")
    return {"worker_run": run.id, "worker_state": state, "cli_output": cli_output, "seconds": seconds}


# ---- refused without the string ------------------------------------------------------------------------


def test_a_client_without_the_string_or_with_a_wrong_one_is_refused(server):
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    user, password = AUTH_STRING.split(":", 1)
    url = f"{server.api_url}/work_pools/filter"
    assert httpx.post(url, json={}, timeout=10).status_code == 401
    assert httpx.post(url, json={}, auth=(user, "wrong"), timeout=10).status_code == 401
    assert httpx.post(url, json={}, auth=(user, password), timeout=10).status_code == 200
    # the health probe stays open: the compose healthcheck and load balancers use it
    assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
    with server.client(auth_string="fvlm-admin:wrong") as client, pytest.raises(PrefectHTTPStatusError) as err:
        client.read_work_pools()
    assert err.value.response.status_code == 401


def test_fvlm_prefect_setup_without_the_string_is_refused_and_changes_nothing(server):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "flows.cli", "prefect", "setup", "--pool", "refused-pool"],
                          env=server.env_without_string(), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "401" in done.stderr, done.stderr[-3000:]
    assert "set PREFECT_API_AUTH_STRING" in done.stderr and "Traceback" not in done.stderr  # one line saying what to do
    with server.client() as client:
        assert "refused-pool" not in {p.name for p in client.read_work_pools()}


# ---- working with the string ---------------------------------------------------------------------------


def test_fvlm_setup_and_train_work_with_the_string(server, runs):
    from tasks.training import read_history

    assert "budget: 1 chunks" in runs["cli_output"], runs["cli_output"][-3000:]
    assert [h["step"] for h in read_history(server.root / "run-cli")] == [4]
    with server.client() as client:
        pool = client.read_work_pool(POOL)
        queues = {q.name for q in client.read_work_queues(work_pool_name=POOL)}
        automations = client.read_automations_by_name("fvlm: crash zombie flow runs")
    assert pool.type == "process" and "gpu-0" in queues and len(automations) == 1


def test_a_worker_with_the_string_runs_a_deployment_and_sends_events(server, runs):
    from tasks.training import read_history

    assert runs["worker_state"].is_completed(), runs["worker_state"]
    assert [h["step"] for h in read_history(server.root / "run-worker")] == [4]
    heartbeat = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                            "resource": {"id": [f"prefect.flow-run.{runs['worker_run']}"]}}, "limit": 10}
    with server.client() as client:
        # the run's heartbeat went over the events websocket, which needs the string as well (the zombie-run
        # automation relies on these events)
        found = wait_until(lambda: client.request("POST", "/events/filter", json=heartbeat).json()["events"], 30,
                           "the worker run's heartbeat event", lambda: server.logs(client, [runs["worker_run"]]))
    assert found[0]["resource"]["prefect.resource.id"] == f"prefect.flow-run.{runs['worker_run']}"


# ---- the string is nowhere -----------------------------------------------------------------------------


def api_records(client) -> tuple[dict[str, str], int]:
    """Every log line, artifact, flow run, deployment, work pool and event the server holds, as JSON text; the
    number of log lines."""
    from prefect.client.schemas.filters import LogFilter

    logs, offset = [], 0
    while page := client.read_logs(log_filter=LogFilter(), limit=200, offset=offset):
        logs += page
        offset += len(page)
    events = client.request("POST", "/events/filter", json={"limit": 50}).json()  # the rest: in the database
    return {
        "logs": json.dumps([log.model_dump(mode="json") for log in logs]),
        "artifacts": json.dumps([a.model_dump(mode="json") for a in client.read_artifacts()]),
        "flow runs": json.dumps([r.model_dump(mode="json") for r in client.read_flow_runs()]),
        "deployments": json.dumps([d.model_dump(mode="json") for d in client.read_deployments()]),
        "work pools": json.dumps([p.model_dump(mode="json") for p in client.read_work_pools()]),
        "events": json.dumps(events),
    }, len(logs)


def test_the_string_appears_in_no_output_log_artifact_or_file(server, runs):
    with server.client() as client:
        records, log_lines = api_records(client)
    assert log_lines > 20 and '"train-ratio-history"' in records["artifacts"]  # the runs' logs and artifacts
    for name, text in records.items():
        assert AUTH_STRING not in text and AUTH_TOKEN not in text, name
    # every file under the server's folder: the server's, worker's and commands' output, the server database
    # (logs, events, artifacts, runs), the client home, both run folders
    files = [p for p in server.root.rglob("*") if p.is_file()]
    assert {"server.log", "worker-gpu0.log", "fvlm-train.log", "prefect.db"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert AUTH_STRING.encode() not in data and AUTH_TOKEN.encode() not in data, path


# ---- the server's own calls ----------------------------------------------------------------------------


def test_the_zombie_automation_still_acts_with_auth_on(server):
    """The automation's action goes through the server's in-process client, which fails silently when refused:
    with auth on, a tagged run whose heartbeats stop must still be marked Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Running

    from tests.flows.test_deployments import _probe_flow, ten_second_zombie_automation

    config, automation = ten_second_zombie_automation()
    with server.client() as client:
        automation_id = client.create_automation(automation)
        run = client.create_flow_run(_probe_flow(), tags=[config.tag])
        client.set_flow_run_state(run.id, Running(), force=True)
        for _ in range(3):  # the first may come before the triggers service has loaded the automation
            client.request("POST", "/events", json=[{
                "id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
                "event": "prefect.flow-run.heartbeat",
                "resource": {"prefect.resource.id": f"prefect.flow-run.{run.id}"},
                "related": [{"prefect.resource.id": f"prefect.tag.{config.tag}", "prefect.resource.role": "tag"}],
            }])
            time.sleep(1)
        crashed = wait_until(lambda: client.read_flow_run(run.id).state.type == StateType.CRASHED, 60,
                             "the silent run to be marked Crashed", lambda: server.logs(client, [run.id]))
        client.delete_automation(automation_id)
    assert crashed
