"""The fault suite's case of a multi-process chunk: SIGKILL of one rank (tests/tasks/test_distributed.py has the
rest of the DDP tests and the helpers used here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from storage.checkpoints import CheckpointStore
from tasks.training import read_history, train_chunk
from tests.tasks.test_distributed import DRIVER, LOADER, REPO, assert_close_weights, latest, worker_pids
from tests.tasks.test_training import make_tiny_store, tiny_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.zarr")


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_in_bounded_time_and_one_process_resumes_to_the_same_weights(store, tmp_path):
    config = tiny_config(loader=LOADER, total_steps=16, checkpoint_every=4, log_every=4, max_minutes=10,
                         dist_timeout_s=30)
    train_chunk(store, tmp_path / "reference", config)  # uninterrupted, one process

    run, config_file = tmp_path / "run", tmp_path / "config.json"
    config_file.write_text(config.model_copy(update={"nproc": 2}).model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "FVLM_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, store, str(run), str(config_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        victim = worker_pids(proc.pid, 2)[1]
        checkpoints = CheckpointStore(run)
        while proc.poll() is None and max(checkpoints.steps(), default=0) < 8:
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before the kill"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - killed
    stderr = err.decode()
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds, stderr[-2000:])
    assert "DistributedChunkError" in stderr and "rank 1: killed by SIGKILL" in stderr, stderr[-3000:]
    assert "resume from there" in stderr
    saved = latest(run)["step"]
    assert 8 <= saved < 16 and read_history(run) == [] and not list(run.glob("*.corrupt"))

    result = train_chunk(store, run, config)  # one process goes on from rank 0's last checkpoint
    assert result.start_step == saved and result.step == 16
    assert_close_weights(latest(run)["model"], latest(tmp_path / "reference")["model"])
    print(f"\nkilled rank 1 after checkpoint {saved}: the job ended {seconds:.1f} s later")
