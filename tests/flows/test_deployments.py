"""The project run the way users run it: `prefect server start` on loopback with its own home, `fvlm prefect
setup`, `prefect deploy --all` from prefect.yaml, one process worker per (pretend) GPU queue, runs triggered
through the API. Covers the deployments' settings and parameter schemas, a scaled-out precompute with a task
retry against a flaky HTTP source and its artifacts, the training chain resubmitting itself under its
concurrency limit, and the zombie-run automation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.tasks.test_training import make_tiny_store, tiny_config

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
POOL = "fvlm-gpu"  # the pool prefect.yaml deploys to


# ---- processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (flow-run processes start sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Service:
    """A subprocess in a session of its own, its output in a log file; `stop` ends it and all it started."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"---- {self.name} (exit {self.proc.poll()}), last {chars} chars of {self.log} ----\n{text[-chars:]}"

    def stop(self) -> None:
        groups = {self.proc.pid}
        for pid in descendants(self.proc.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for group in groups:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        for group in groups:  # flow runs left behind by a worker that went first
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME, and the environment its clients use."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.services: list[Service] = []
        self.deploy_seconds = 0.0
        self.client_env = dict(
            os.environ, PREFECT_API_URL=self.api_url, PREFECT_HOME=str(root / "client-home"),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(root / "results"), PREFECT_LOGGING_LEVEL="INFO",
            PYTHONPATH=str(REPO_ROOT), FVLM_PROJECT_DIR=str(REPO_ROOT),
        )

    def start(self, timeout_s: float = 180) -> None:
        env = dict(
            self.client_env, PREFECT_HOME=str(self.root / "server-home"), PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
            # no nightly runs in the tests' flow-run lists; a queued chunk retries its slot every second
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
            PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1",
        )
        env.pop("PREFECT_API_URL")
        server = self.spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(self.port), "--no-ui"], env)
        self.wait_until_healthy(server, timeout_s)

    def wait_until_healthy(self, server: Service, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError("the Prefect server exited\n" + server.tail())
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Prefect server did not answer within {timeout_s} s\n" + server.tail())

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        # outside the project: runs find it through FVLM_PROJECT_DIR and the deployments' pull step
        service = Service(name, args, env or self.client_env, self.root, cwd=self.root)
        self.services.append(service)
        return service

    def run(self, args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(args, env=self.client_env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
        assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def logs(self, client, flow_run_ids: list) -> str:
        """Server and worker logs plus the runs' own logs, for assertion messages."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        lines = []
        if flow_run_ids:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids))),
                                    limit=200)
            lines = [f"{log.timestamp:%H:%M:%S} {log.flow_run_id} {log.message}" for log in logs]
        text = "\n".join(s.tail() for s in self.services)
        return text + "\n---- flow run logs ----\n" + "\n".join(lines)[-8000:]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect-server")
    server = PrefectServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def deployed(server):
    """The setup command and `prefect deploy --all`, as the README tells users to run them."""
    started = time.monotonic()
    server.run([sys.executable, "-m", "flows.cli", "prefect", "setup", "--gpus", "2", "--pool", POOL])
    server.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"])
    server.deploy_seconds = time.monotonic() - started
    return server


@pytest.fixture(scope="module")
def workers(deployed):
    """One process worker per GPU queue, each with its own CUDA_VISIBLE_DEVICES, polling every second."""
    for gpu in (0, 1):
        env = dict(deployed.client_env, CUDA_VISIBLE_DEVICES=str(gpu), PREFECT_WORKER_QUERY_SECONDS="1")
        deployed.spawn(f"worker-gpu{gpu}", [sys.executable, "-m", "prefect", "worker", "start", "--type", "process",
                                            "--pool", POOL, "--work-queue", f"gpu-{gpu}", "--name", f"gpu{gpu}"], env)
    with deployed.client() as client:
        wait_until(lambda: len(client.read_workers_for_work_pool(POOL)) >= 2, 120, "workers to register",
                   lambda: deployed.logs(client, []))
    return deployed


def wait_until(ready: Callable[[], Any], timeout_s: float, what: str, diagnostics: Callable[[], str],
               every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{diagnostics()}")


def deployment(client, name: str):
    return client.read_deployment_by_name(name)


def deployment_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


# ---- deployments as configured --------------------------------------------------------------------------


def test_deployments_have_their_pool_schedule_limit_and_pull_step(deployed):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    with deployed.client() as client:
        deployments = {name: deployment(client, name) for name in (
            "precompute/precompute", "precompute-chunks/precompute-chunks", "train/train", "demo/demo")}
        pool = client.read_work_pool(POOL)
    assert pool.type == "process"
    for name, d in deployments.items():
        assert d.work_pool_name == POOL and d.work_queue_name == "gpu-0", name
        assert d.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0", name
        assert int(d.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30, name
        assert "fvlm" in d.tags and d.enforce_parameter_schema, name
        # the worker reads the project folder from its own environment at run time
        assert d.pull_steps == [{"flows.infra.enter_project_dir": {"variable": "FVLM_PROJECT_DIR"}}], name
    train = deployments["train/train"]
    assert train.global_concurrency_limit is not None and train.global_concurrency_limit.limit == 1
    assert train.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    (schedule,) = train.schedules
    assert schedule.active and schedule.schedule.cron == "0 1 * * *" and schedule.schedule.timezone == "UTC"
    assert all(d.global_concurrency_limit is None for n, d in deployments.items() if n != "train/train")
    assert not deployments["precompute/precompute"].schedules


def test_parameter_schemas_carry_descriptions_and_defaults(deployed):
    with deployed.client() as client:
        precompute = deployment(client, "precompute/precompute").parameter_openapi_schema
        train = deployment(client, "train/train").parameter_openapi_schema
    top = precompute["properties"]
    assert set(precompute["required"]) == {"manifest", "store"}
    assert top["manifest"]["description"].startswith("CSV / Parquet") and top["scale_out"]["description"]
    assert top["device"]["default"] == "auto"
    listing = precompute["definitions"]["ListingConfig"]["properties"]
    assert listing["min_duration_s"]["default"] == 20.0 and listing["min_duration_s"]["minimum"] == 0
    assert "Shortest kept video" in listing["min_duration_s"]["description"]
    scale_out = precompute["definitions"]["ScaleOut"]["properties"]
    assert scale_out["gpus"]["default"] == 0 and "gpu-" in scale_out["gpus"]["description"]
    assert train["properties"]["preset"]["enum"] == ["demo", "full"]
    # the run form: the knobs people change as plain fields; the training config only as advanced overrides
    for knob in ("batch_size", "lr", "max_minutes", "max_chunks"):
        assert train["properties"][knob]["default"] is None and train["properties"][knob]["description"], knob
    assert train["properties"]["train"]["anyOf"][0]["type"] == "object"
    assert "TrainConfig" not in train["definitions"]
    convergence = train["definitions"]["ConvergenceConfig"]["properties"]
    assert convergence["max_chunks"]["default"] == 12 and convergence["max_chunks"]["description"]


@pytest.mark.parametrize("name, parameters, bad", [
    ("train/train", {"preset": "huge"}, "huge"),
    ("train/train", {"convergence": {"window": 1}}, "window"),
    ("precompute/precompute", {"listing": {"min_duration_s": -5}}, "min_duration_s"),
    ("precompute/precompute", {"scale_out": {"workers": 0}}, "workers"),
])
def test_the_server_rejects_bad_parameter_values(deployed, name, parameters, bad):
    from prefect.exceptions import PrefectHTTPStatusError

    with deployed.client() as client:
        d = deployment(client, name)
        before = len(deployment_runs(client, d.id))
        with pytest.raises(PrefectHTTPStatusError) as err:
            client.create_flow_run_from_deployment(d.id, parameters=parameters)
        assert len(deployment_runs(client, d.id)) == before
    assert err.value.response.status_code == 409 and bad in err.value.response.text


# ---- precompute: scale-out, a task retry, artifacts ----------------------------------------------------


class FlakySource:
    """Serves a folder on 127.0.0.1; the first GET of each path answers 503 (a transient error)."""

    def __init__(self, folder: Path):
        self.requests: dict[str, list[int]] = {}
        source = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                answers = source.requests.setdefault(self.path, [])
                if not answers:
                    answers.append(503)
                    self.send_error(503, "warming up")
                    return
                answers.append(200)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_collection(folder: Path, remote_url: str) -> Path:
    """Five local videos and one served over HTTP (kept, 20-60 s), and one too short (dropped)."""
    from tasks.samples import iso_duration, make_video, write_manifest

    rows = []
    for i, seconds in enumerate([21, 24, 27, 30, 33, 12]):
        name = f"videos/v{i}.mp4"
        make_video(folder / name, seconds, fps=2, size=(64, 48), seed=i)
        rows.append({"videoid": f"v{i}", "contentUrl": name, "duration": iso_duration(seconds), "name": f"clip {i}"})
    make_video(folder / "served" / "remote.mp4", 22, fps=2, size=(64, 48), seed=9)
    rows.append({"videoid": "remote", "contentUrl": remote_url, "duration": iso_duration(22), "name": "served"})
    return write_manifest(folder / "manifest.csv", rows)


def wait_for_final(server: PrefectServer, client, run_id, timeout_s: float, related: Callable[[], list]):
    def final():
        run = client.read_flow_run(run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_until(final, timeout_s, f"flow run {run_id} to finish",
                      lambda: server.logs(client, [run_id, *related()]), every_s=2)


def test_precompute_scales_out_retries_a_flaky_source_and_reports(workers, tmp_path):
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
        TaskRunFilter, TaskRunFilterName,
    )

    from storage.store import OK, FeatureStore

    token = uuid.uuid4().hex  # a URL no earlier run has cached
    source = FlakySource(tmp_path)
    manifest = write_collection(tmp_path, f"{source.url}/served/remote.mp4?run={token}")
    store = tmp_path / "features.zarr"
    parameters = {
        "manifest": str(manifest), "store": str(store), "encoder": {"preset": "demo"}, "decode": {"workers": 1},
        "layout": {"chunk_videos": 2}, "device": "cpu", "scale_out": {"workers": 2, "gpus": 2},
    }
    started = time.monotonic()
    try:
        with workers.client() as client:
            parent = client.create_flow_run_from_deployment(deployment(client, "precompute/precompute").id,
                                                            parameters=parameters)
            chunk_deployment = deployment(client, "precompute-chunks/precompute-chunks")

            def children() -> list:
                return [r for r in deployment_runs(client, chunk_deployment.id) if r.parameters["store"] ==
                        str(store.resolve())]

            parent = wait_for_final(workers, client, parent.id, 480, lambda: [c.id for c in children()])
            seconds = time.monotonic() - started
            runs = children()
            diagnostics = workers.logs(client, [parent.id, *[r.id for r in runs]])
            assert parent.state.is_completed(), diagnostics

            # two worker runs, one per GPU queue, owning disjoint whole chunks that cover the store
            assert len(runs) == 2 and all(r.state.is_completed() for r in runs), diagnostics
            by_queue = {r.work_queue_name: r for r in runs}
            assert set(by_queue) == {"gpu-0", "gpu-1"}
            for gpu in (0, 1):
                run = by_queue[f"gpu-{gpu}"]
                assert run.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == str(gpu)
                assert "fvlm" in run.tags and run.parent_task_run_id is not None
            chunks = sorted(c for r in runs for c in r.parameters["chunks"])
            assert chunks == [0, 1, 2] and not set(runs[0].parameters["chunks"]) & set(runs[1].parameters["chunks"])

            # the fetch of the served video failed once and was retried by Prefect
            fetches = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="fetch-sources")))
            assert len(fetches) == 1, diagnostics
            fetch = fetches[0]
            names = [s.name for s in client.read_task_run_states(fetch.id)]
            assert fetch.state.is_completed() and fetch.run_count == 2, (names, diagnostics)
            assert "AwaitingRetry" in names and "Retrying" in names, names
            assert list(source.requests.values()) == [[503, 200]]

            # artifacts under their keys: the report on the parent, progress on each worker run
            (report,) = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["precompute-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id])))
            assert report.type == "table" and "dropped: too_short" in str(report.data)
            rows = json.loads(report.data) if isinstance(report.data, str) else report.data
            assert {"metric": "download retries (this run)", "value": 1} in rows, rows  # the retry, in the report
            progress = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))
            assert sorted(a.data for a in progress if a.type == "progress") == [100.0, 100.0]
    finally:
        source.close()
    info = FeatureStore.open(store).counts()
    assert info == {"videos": 6, "ok": 6, "failed": 0, "pending": 0}, info
    assert (FeatureStore.open(store).read_status() == OK).all()
    print(f"precompute through the deployment: {seconds:.1f} s")


# ---- the training chain --------------------------------------------------------------------------------


def tiny_train_config() -> dict:
    from storage.loader import LoaderConfig

    return tiny_config(loader=LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=0, eval_fraction=0.25),
                       warmup_steps=2, total_steps=1000, checkpoint_every=100, max_steps_per_chunk=4,
                       eval_batches=1, attention_videos=0).model_dump(mode="json")


def test_training_chain_resubmits_itself_one_chunk_at_a_time_until_the_budget(workers, tmp_path):
    """The chain of a run folder, plus a run started while a chunk trains (as the nightly schedule does): that
    run waits for the deployment's slot, the chain stops by its budget, and no two chunks ever run at once."""
    from flows.train import chunk_key
    from tasks.convergence import ConvergenceConfig, read_state
    from tasks.training import read_history

    run_dir = tmp_path / "run"
    parameters = {
        "store": make_tiny_store(tmp_path / "tiny.zarr", videos=16), "run_dir": str(run_dir), "preset": "demo",
        "train": tiny_train_config(),
        # no convergence before the budget: the chain stops by max_chunks
        "convergence": ConvergenceConfig(min_steps=10**6, window=2, max_chunks=3).model_dump(mode="json"),
    }
    started = time.monotonic()
    with workers.client() as client:
        train = deployment(client, "train/train")

        def chain() -> list:
            return [r for r in deployment_runs(client, train.id) if r.parameters.get("run_dir") == str(run_dir)]

        def diagnostics() -> str:
            return workers.logs(client, [r.id for r in chain()])

        first = client.create_flow_run_from_deployment(train.id, parameters=parameters)
        wait_until(lambda: client.read_flow_run(first.id).state.is_running(), 120, "the first chunk to start",
                   diagnostics, every_s=0.5)
        scheduled = client.create_flow_run_from_deployment(train.id, parameters=parameters)

        def finished() -> list | None:
            runs = chain()
            done = read_state(run_dir).get("done") if (run_dir / "state.json").exists() else False
            return runs if done and all(r.state is not None and r.state.is_final() for r in runs) else None

        wait_until(finished, 480, "the training chain to stop", diagnostics, every_s=2)
        seconds = time.monotonic() - started
        time.sleep(3)  # a chunk submitted after the stop would show up by now
        runs = sorted(chain(), key=lambda r: r.start_time)
        report = diagnostics()
        states = {r.id: [s.name for s in client.read_flow_run_states(r.id)] for r in runs}

    # four completed runs of the one deployment: the first, the scheduled one, and the two chunks submitted by
    # the chain itself (one of the four finds the budget spent and returns at once)
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs), report
    assert {first.id, scheduled.id} <= {r.id for r in runs} and all(r.deployment_id == train.id for r in runs)
    submitted = sorted(r.idempotency_key for r in runs if r.id not in (first.id, scheduled.id))
    assert submitted == [chunk_key(str(run_dir), 2), chunk_key(str(run_dir), 3)], report
    assert all(r.parameters["train"] == parameters["train"] and r.parameters["convergence"] ==
               parameters["convergence"] for r in runs)
    # a run queued behind a running chunk (which one depends on timing: the scheduled run, or a chunk the chain
    # submitted while the scheduled run trained), and no two runs ever overlapped
    assert any("AwaitingConcurrencySlot" in names for run_id, names in states.items() if run_id != first.id), states
    for before, after in zip(runs, runs[1:]):
        assert before.end_time <= after.start_time, (before.end_time, after.start_time, states)
    history = read_history(run_dir)
    assert [h["chunk"] for h in history] == [1, 2, 3] and [h["step"] for h in history] == [4, 8, 12]
    state = read_state(run_dir)
    assert state["done"] and not state["converged"] and state["reason"] == "budget: 3 chunks" and \
        state["chunks_done"] == 3, state
    print(f"training chain through the deployment: {seconds:.1f} s; states: {list(states.values())}")


def chain_runs(client, deployment_id, run_dir: Path, before: set | frozenset = frozenset()) -> list:
    """The runs of the train deployment for `run_dir`, but those in `before`, oldest first."""
    runs = [r for r in deployment_runs(client, deployment_id)
            if r.parameters.get("run_dir") == str(run_dir) and r.id not in before]
    return sorted(runs, key=lambda r: r.created)


def chain_parameters(tmp_path: Path, run_dir: Path, **train: Any) -> dict:
    """A demo chain on a tiny store that stops by its budget of 2 chunks (never by convergence)."""
    from tasks.convergence import ConvergenceConfig

    return {
        "store": make_tiny_store(tmp_path / "tiny.zarr", videos=16), "run_dir": str(run_dir), "preset": "demo",
        "train": {**tiny_train_config(), **train},
        "convergence": ConvergenceConfig(min_steps=10**6, window=2, max_chunks=2).model_dump(mode="json"),
    }


def all_final(runs: list) -> bool:
    return bool(runs) and all(r.state is not None and r.state.is_final() for r in runs)


def test_cancelling_a_running_chunk_saves_it_and_stops_the_chain(workers, tmp_path):
    """A cancel from the UI (the run set to Cancelling; the worker sends the process group SIGTERM): the chunk
    stops at its next step, saves a checkpoint and records itself, the runs waiting to train the folder next are
    cancelled, the run ends Cancelled, and a new run continues from the checkpoint."""
    from prefect.states import Cancelling

    from flows.train import chunk_key
    from storage.checkpoints import CheckpointStore
    from tasks.training import read_history

    run_dir = tmp_path / "run"
    parameters = chain_parameters(tmp_path, run_dir, max_steps_per_chunk=None, total_steps=10**6,
                                  checkpoint_every=50, max_minutes=10.0)
    with workers.client() as client:
        train = deployment(client, "train/train")

        def diagnostics() -> str:
            return workers.logs(client, [r.id for r in chain_runs(client, train.id, run_dir)])

        first = client.create_flow_run_from_deployment(train.id, parameters=parameters)
        wait_until(lambda: CheckpointStore(run_dir).steps(), 180, "the chunk to save a checkpoint", diagnostics)
        # waiting for the slot: the chain's next chunk (its key), and a run of the same folder (a nightly run)
        waiting = [client.create_flow_run_from_deployment(train.id, parameters=parameters,
                                                          idempotency_key=chunk_key(str(run_dir), 2)),
                   client.create_flow_run_from_deployment(train.id, parameters=parameters)]
        time.sleep(2)
        cancelled_at = time.monotonic()
        response = client.set_flow_run_state(first.id, Cancelling(message="cancelled from the UI"))
        assert response.status.value == "ACCEPT", response
        first = wait_for_final(workers, client, first.id, 120, lambda: [w.id for w in waiting])
        seconds = time.monotonic() - cancelled_at
        time.sleep(3)  # a chunk submitted or started after the cancel would show up by now
        runs = chain_runs(client, train.id, run_dir)
        report = diagnostics()
        assert first.state.is_cancelled(), report
        assert all(r.state.is_cancelled() for r in runs if r.id != first.id) and len(runs) == 3, \
            [(r.name, r.state.name, r.idempotency_key) for r in runs]

        history = read_history(run_dir)
        assert len(history) == 1 and history[0]["stopped_by"] == "cancelled", (history, report)
        step = history[0]["step"]
        assert step > 0 and CheckpointStore(run_dir).steps()[-1] == step, (CheckpointStore(run_dir).steps(), step)

        # a new run (the nightly one, or one from the UI) continues from that checkpoint
        again = client.create_flow_run_from_deployment(train.id, parameters={
            **parameters, "train": {**parameters["train"], "max_steps_per_chunk": 4}})
        again = wait_for_final(workers, client, again.id, 240, lambda: [])
        assert again.state.is_completed(), diagnostics()
    history = read_history(run_dir)
    assert [h["chunk"] for h in history] == [1, 2] and history[1]["step"] == step + 4, history
    print(f"cancelled chunk at step {step}, run Cancelled {seconds:.1f} s after the cancel")


def test_a_run_folder_deleted_and_started_again_starts_a_working_chain(workers, tmp_path):
    """Prefect keeps an idempotency key per flow for good: the second chain on the same path must not get the
    first chain's chunk-2 run back, it must train its own."""
    from tasks.training import read_history

    run_dir = tmp_path / "nightly"
    parameters = chain_parameters(tmp_path, run_dir)
    seen: set = set()
    second_chunks = []
    with workers.client() as client:
        train = deployment(client, "train/train")
        for attempt in range(2):
            client.create_flow_run_from_deployment(train.id, parameters=parameters)

            def finished() -> list | None:
                runs = chain_runs(client, train.id, run_dir, seen)
                return runs if len(runs) >= 2 and all_final(runs) else None

            runs = wait_until(finished, 300, f"chain {attempt + 1} to train 2 chunks",
                              lambda: workers.logs(client, [r.id for r in chain_runs(client, train.id, run_dir)]),
                              every_s=2)
            assert all(r.state.is_completed() for r in runs) and len(runs) == 2, [r.state for r in runs]
            assert [h["chunk"] for h in read_history(run_dir)] == [1, 2], attempt
            second_chunks.append(runs[1])
            seen |= {r.id for r in runs}
            shutil.rmtree(run_dir)  # the user deletes the run folder and starts over
    assert second_chunks[0].id != second_chunks[1].id
    assert second_chunks[0].idempotency_key != second_chunks[1].idempotency_key


# ---- zombie runs ---------------------------------------------------------------------------------------


def ten_second_zombie_automation():
    """The setup's zombie automation with a 10 s window (the server's minimum) and a tag of its own."""
    from flows.infra import InfraConfig, zombie_automation

    config = InfraConfig(tag=f"zombie-{uuid.uuid4().hex[:6]}", automation="test: zombie runs within 10 s")
    automation = zombie_automation(config)
    return config, automation.model_copy(update={"trigger": automation.trigger.model_copy(
        update={"within": timedelta(seconds=10)})})


def test_a_run_whose_heartbeats_stop_is_marked_crashed(deployed):
    """The setup's automation with a 10 s window (the server's minimum), on runs with and without the tag."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Running

    config, automation = ten_second_zombie_automation()
    with deployed.client() as client:
        automation_id = client.create_automation(automation)
        runs = {}
        for tag in (config.tag, "someone-else"):
            run = client.create_flow_run(_probe_flow(), tags=[tag])
            client.set_flow_run_state(run.id, Running(), force=True)
            runs[tag] = run.id
        # a few heartbeats (the first may come before the triggers service has loaded the new automation),
        # then silence: the process "died"
        for _ in range(3):
            for tag, run_id in runs.items():
                heartbeat = {
                    "id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
                    "event": "prefect.flow-run.heartbeat",
                    "resource": {"prefect.resource.id": f"prefect.flow-run.{run_id}"},
                    "related": [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}],
                }
                client.request("POST", "/events", json=[heartbeat])
            time.sleep(2)
        assert client.read_flow_run(runs[config.tag]).state.type == StateType.RUNNING  # not before the silence
        crashed = wait_until(lambda: client.read_flow_run(runs[config.tag]).state.type == StateType.CRASHED, 90,
                             "the silent run to be marked Crashed", lambda: deployed.logs(client, list(runs.values())))
        untagged = client.read_flow_run(runs["someone-else"]).state.type
        client.delete_automation(automation_id)
    assert crashed and untagged == StateType.RUNNING


def _probe_flow():
    from prefect import flow

    @flow(name="zombie-probe")
    def probe() -> None:
        """Never runs: the test only needs flow runs to put in states."""

    return probe
