"""Safety: .pt files are data, never code; secrets stay out of logs, artifacts and run folders."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.checkpoints import CheckpointError, CheckpointStore
from storage.store import FeatureStore
from tasks.training import WandbConfig, train_chunk
from tests.s3_server import TEST_SECRET_KEY
from tests.storage.test_import_pt import write_seed_folder
from tests.tasks.test_training import make_tiny_store, tiny_config

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "model", "storage", "benchmarks")


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a malicious .pt file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_file(path: Path, marker: Path, **data) -> Path:
    torch.save({**data, "extra": Payload(marker)}, path)
    # The payload is live: a plain (unsafe) load would run it. Without this the tests below could pass vacuously.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for package in PACKAGES:
        for source in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    keywords = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value
                    calls.append((f"{source.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "the scan found no torch.load at all: it is looking in the wrong place"
    assert [where for where, safe in calls if not safe] == []


def test_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(tmp_path, caplog):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    path = malicious_file(run / "checkpoint-000000010.pt", marker, step=10, model={})
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*weights-only loading.*GLOBAL posix.system"):
        CheckpointStore(run).load(path)
    assert not marker.exists()
    # A training chunk that finds it as the run folder's latest checkpoint refuses to go on, and runs nothing.
    store = make_tiny_store(tmp_path / "s.zarr", videos=8)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="every checkpoint"):
        train_chunk(store, run, tiny_config(max_steps_per_chunk=2))
    assert not marker.exists() and "GLOBAL posix.system" in caplog.text


def test_import_pt_records_a_malicious_file_as_failed_without_running_it(tmp_path):
    write_seed_folder(tmp_path / "pt", n=3)
    marker = tmp_path / "pwned"
    good = torch.load(tmp_path / "pt" / "vid000.pt", weights_only=True)
    malicious_file(tmp_path / "pt" / "evil.pt", marker, **good)
    run = subprocess.run([sys.executable, "-m", "flows.cli", "store", "import-pt", str(tmp_path / "pt"),
                          str(tmp_path / "s.zarr"), "--chunk-videos", "2"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert not marker.exists()
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.counts()["ok"] == 3
    [failure] = store.failures()
    assert failure["video_id"] == "evil" and "weights-only loading" in failure["error"]
    assert "GLOBAL posix.system" in failure["error"]


@pytest.mark.slow
def test_no_secret_in_logs_artifacts_or_the_run_folder(tmp_path, monkeypatch, capfd, caplog, prefect_harness,
                                                       s3_env):
    """With a wandb key, a Prefect API key and an S3 secret key in the environment, a training chain (a Prefect
    flow, wandb offline) reading its store from s3:// writes none of them anywhere: not in its logs (captured and
    on the server), artifacts, checkpoints, history, wandb files or pictures."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    from flows.train import train_flow
    from tasks.convergence import ConvergenceConfig

    secrets = {"WANDB_API_KEY": "wandb-secret-" + "9f3c" * 8, "PREFECT_API_KEY": "pnu_secret" + "71ab" * 8,
               "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY}  # s3_env set it: the store below is on the S3 server
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # the test session keeps them at WARNING
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)
    store = make_tiny_store(f"{s3_env}/s.zarr", videos=16)
    config = tiny_config(max_steps_per_chunk=4, wandb=WandbConfig(mode="offline"))
    with caplog.at_level(logging.DEBUG):
        state = train_flow(store=store, run_dir=str(tmp_path / "run"), preset="demo", train=config,
                           convergence=ConvergenceConfig(min_steps=0, window=4, max_chunks=2), return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id

    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    captured = capfd.readouterr()
    texts = {
        "server logs": "\n".join(entry.message for entry in logs),
        "artifacts": "\n".join(json.dumps(a.data) if not isinstance(a.data, str) else a.data for a in artifacts),
        "captured logs": caplog.text, "stdout": captured.out, "stderr": captured.err,
    }
    assert artifacts and (tmp_path / "run" / "wandb").is_dir()  # there was something to search
    assert "| loss_fine" in texts["server logs"]  # the training task's own step lines reach the server too
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".wandb" for p in files)
    for value in secrets.values():
        for where, text in texts.items():
            assert value not in text, f"a secret is in the {where}"
        for path in files:
            assert value.encode() not in path.read_bytes(), f"a secret is in {path.relative_to(tmp_path)}"
