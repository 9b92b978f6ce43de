"""The store on object storage, as a user runs it: `fvlm precompute --store s3://...` on the shared sample videos
against a real S3 API server on loopback (moto), then `fvlm store info --json` and one `fvlm train` chunk from
that URL. The credentials come from the standard AWS variables and appear in no output, log or artifact."""

import json

import pytest

from storage.store import FeatureStore
from tasks.training import read_history
from tests.flows.test_cli import fvlm
from tests.flows.test_precompute_flow import cli_env
from tests.s3_server import TEST_SECRET_KEY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, prefect_harness, s3_server, shared_videos):
    """Precompute the shared sample videos into s3://<bucket>/features.zarr, read it back, train one chunk."""
    work = tmp_path_factory.mktemp("s3cli")
    bucket = s3_server.make_bucket("fvlm-cli")
    env = {**cli_env(work), **s3_server.env()}
    env.pop("AWS_PROFILE", None)
    url = f"{bucket}/features.zarr"
    runs = {"precompute": fvlm("precompute", "--manifest", str(shared_videos), "--store", url, "--preset", "demo",
                               "--min-duration", "0", "--max-duration", "100000", "--feature-codec", "int8",
                               "--device", "cpu", env=env)}
    runs["info"] = fvlm("store", "info", url, "--json", env=env)
    runs["train"] = fvlm("train", "--store", url, "--run-dir", str(work / "run"), "--preset", "demo",
                         "--max-minutes", "0.05", "--max-chunks", "1", "--batch-size", "2", "--wandb", "offline",
                         "--device", "cpu", env=env)
    return url, work, env, runs


def test_precompute_writes_the_store_at_the_url(s3_run, s3_server, monkeypatch):
    url, _, _, runs = s3_run
    assert "videos     3 ok, 3 failed, 0 pending" in runs["precompute"].stdout
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = FeatureStore.open(url)
    assert store.feature_codec == "int8" and str(store.group["dino_features"].dtype) == "int8"
    assert store.counts() == {"videos": 6, "ok": 3, "failed": 3, "pending": 0}


def test_store_info_reads_the_url(s3_run):
    url, _, _, runs = s3_run
    info = json.loads(runs["info"].stdout)
    assert info["path"] == url and info["ok"] == 3 and info["feature_codec"] == "int8"
    sizes = info["sizes"]
    assert sizes["disk_bytes"] > 3 * 24 * 325 * 384  # the objects' bytes, measured by listing the bucket
    assert sizes["feature_bytes_per_video"] <= 3_200_000  # half of float16's 6.19 MB


def test_one_training_chunk_reads_the_url(s3_run):
    _, work, _, runs = s3_run
    assert "training   1 chunks" in runs["train"].stdout
    history = read_history(work / "run")
    assert len(history) == 1 and history[0]["step"] > 0
    assert history[0]["eval_samples"] == 1  # the held-out video, read from the URL
    assert 0 < history[0]["loss_fine"] < 10 and 0 < history[0]["loss_coarse"] < 10
    assert list((work / "run" / "attention").glob("*.png"))  # drawn from the store at the URL


def test_the_secret_key_appears_in_no_output_log_or_artifact(s3_run):
    _, work, _, runs = s3_run
    for name, run in runs.items():
        assert TEST_SECRET_KEY not in run.stdout + run.stderr, name
    for path in work.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert TEST_SECRET_KEY.encode() not in path.read_bytes(), path
