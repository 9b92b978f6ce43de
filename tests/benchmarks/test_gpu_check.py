"""benchmarks/gpu_check.py: refuses without a GPU, runs every code path shrunk on a CPU, meets its targets on a GPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def run_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def last_json(done: subprocess.CompletedProcess) -> dict:
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("args", [
    pytest.param((), id="default-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    pytest.param(("--device", "cpu"), id="cpu-without-smoke"),
])
def test_refuses_without_a_gpu_unless_smoke(args):
    done = run_check(*args, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "--smoke" in message[0] and "--device cpu" in message[0], done.stderr
    assert done.stdout == ""  # nothing ran


def test_refuses_an_unknown_part():
    done = run_check("--device", "cpu", "--smoke", "--part", "a,x", timeout=120)
    assert done.returncode == 2
    assert "--part" in done.stderr


@pytest.mark.slow
def test_smoke_run_on_cpu_exercises_all_three_parts():
    done = run_check("--device", "cpu", "--smoke", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = last_json(done)
    assert result["smoke"] is True and result["device"].startswith("cpu")
    a, b, c = result["a"], result["b"], result["c"]
    assert "error" not in a and "error" not in b and "error" not in c, result
    # a: eager vs eager on a CPU (compile skipped, said so), same weights and batches -> the same losses
    assert a["compiled"] is False and "torch.compile skipped" in done.stdout
    assert len(a["losses_eager"]) == len(a["losses_compiled"]) == a["steps"] == 2
    assert all(math.isfinite(x) and x > 0 for x in a["losses_eager"])
    assert a["losses_eager"] == a["losses_compiled"] and a["grad_cosine_first_step"] == pytest.approx(1.0)
    assert result["targets_met"] == {"a_max_rel_loss_diff_le_2pct": None, "a_grad_cosine_first_step_ge_0.99": None}
    # b: both generated videos listed, encoded by the `full` preset from saved folders, committed
    assert b["kept"] == 2 and b["ok"] + b["failed"] == 2 and b["failed_nonfinite"] <= b["failed"]
    assert b["videos_per_s"] > 0 and b["encoders"].startswith("tiny random")
    # c: timed steps ran and the loss stayed finite
    assert c["samples_per_s"] > 0 and c["steps"] == 2 and c["last_loss_finite"] is True


@pytest.mark.gpu
def test_compiled_step_matches_eager_on_a_gpu():
    done = run_check("--part", "a", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = last_json(done)
    a = result["a"]
    assert a["compiled"] is True and result["b"] is None and result["c"] is None
    assert a["max_rel_loss_diff"] <= 0.02, a
    assert a["grad_cosine_first_step"] >= 0.99, a
    assert result["targets_met"] == {"a_max_rel_loss_diff_le_2pct": True, "a_grad_cosine_first_step_ge_0.99": True}
