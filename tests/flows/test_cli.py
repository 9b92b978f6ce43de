"""The command line as users run it: `fvlm demo`, then `fvlm train` twice on the demo's store."""

import json
import subprocess
import sys

import pytest

from tasks.convergence import read_state
from tasks.training import read_history
from tests.flows.test_precompute_flow import cli_env

pytestmark = pytest.mark.slow


def fvlm(*args, env, timeout=900):
    run = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"fvlm {' '.join(args)} failed:\n{run.stdout}\n{run.stderr[-4000:]}"
    return run


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("demo")
    env = cli_env(work)
    run = fvlm("demo", "--workdir", str(work / "demo"), "--videos", "24", "--max-minutes", "0.1",
               "--max-chunks", "2", env=env)
    return work / "demo", run.stdout, env


def test_demo_runs_the_whole_pipeline_and_says_where_everything_is(demo):
    root, out, _ = demo
    assert "fvlm demo finished" in out
    assert "dropped" in out and "too_short" in out and "too_long" in out  # the filter visibly worked
    assert "training   2 chunks" in out and "ratio" in out
    for place in ("features.zarr", "run", "wandb", "attention"):
        assert place in out
    assert (root / "videos" / "manifest.csv").exists()
    history = read_history(root / "run")
    assert [h["chunk"] for h in history] == [1, 2] and history[1]["step"] > history[0]["step"]
    assert list((root / "run" / "attention").glob("chunk-002-*.png"))
    assert list((root / "run" / "wandb").glob("offline-run-*"))
    assert read_state(root / "run")["chunks_done"] == 2


def test_store_info_reports_the_demo_store(demo):
    root, _, env = demo
    info = json.loads(fvlm("store", "info", str(root / "features.zarr"), "--json", env=env).stdout)
    assert info["ok"] + info["failed"] == info["videos"] and info["pending"] == 0
    assert info["listing"]["dropped"]["too_short"] >= 1 and info["listing"]["dropped"]["too_long"] >= 1
    assert info["attributes"]["dino"]["id"] == "demo:sincos-dinov2"
    assert info["sampling"]["mode"] == "window" and info["sampling"]["window_frames"] == 72  # the seed's window
    assert info["frame_interval"]["median_s"] == pytest.approx(71 / 23 / 5, rel=0.01)  # every third frame at 5 fps


def test_a_second_train_continues_the_history(demo, tmp_path):
    root, _, env = demo
    store, run_dir = str(root / "features.zarr"), str(tmp_path / "run")
    common = ["train", "--store", store, "--run-dir", run_dir, "--preset", "demo", "--max-minutes", "0.05",
              "--wandb", "disabled"]
    first = fvlm(*common, "--max-chunks", "1", env=env)
    assert "1 chunks" in first.stdout and "budget: 1 chunks" in first.stdout
    fvlm(*common, "--max-chunks", "3", env=env)
    history = read_history(run_dir)
    assert [h["chunk"] for h in history] == [1, 2, 3]
    steps = [h["step"] for h in history]
    assert steps == sorted(steps) and len(set(steps)) == 3  # steps keep increasing, no chunk repeated
    again = fvlm(*common, "--max-chunks", "3", env=env)
    assert len(read_history(run_dir)) == 3 and "budget: 3 chunks" in again.stdout


def test_bad_manifest_is_refused_with_the_file_and_column(tmp_path, prefect_harness):
    manifest = tmp_path / "m.csv"
    manifest.write_text("videoid,name\n1,a clip\n")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "precompute", "--manifest", str(manifest), "--store",
                          str(tmp_path / "s.zarr"), "--preset", "demo"], env=cli_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert str(manifest) in run.stderr and "contentUrl" in run.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_train_on_a_store_of_another_preset_says_why_in_one_line(demo, tmp_path):
    root, _, env = demo
    run = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--store", str(root / "features.zarr"),
                          "--run-dir", str(tmp_path / "run"), "--preset", "full", "--max-chunks", "1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "does not match the training config" in last and "dino: store has 'demo:sincos-dinov2'" in last
