"""benchmarks/train_ddp.py runs end to end on the CPU and reports samples/s for each nproc from one run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_ddp_benchmark_measures_one_and_two_processes_in_one_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FVLM_PROGRESS": "0"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_ddp.py"), "--preset", "tiny", "--steps",
                          "3", "--videos", "24", "--nprocs", "1", "2", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report["nproc"]) == {"1", "2"} and all(v > 0 for v in report["nproc"].values())
    assert report["details"]["2"]["steps"] == report["details"]["1"]["steps"] == 3
    assert (tmp_path / "run-2" / "history.jsonl").exists()
