import json

import numpy as np
import pytest

from tasks.convergence import ConvergenceConfig, decide, read_state, write_state

RULE = ConvergenceConfig(min_steps=1000, window=4, tolerance_pct=0.5, max_chunks=20)


def history(ratios, steps_per_chunk=500, seconds=600.0):
    return [{"chunk": i + 1, "step": (i + 1) * steps_per_chunk, "ratio": r, "improvement_pct": (r - 1) * 100,
             "seconds": seconds} for i, r in enumerate(ratios)]


def test_flat_ratio_converges_with_a_readable_reason():
    d = decide(history([1.05, 1.100, 1.101, 1.102, 1.1015]), RULE)
    assert d.done and d.converged
    assert d.reason.startswith("ratio changed 0.18 % over the last 4 evaluations < 0.5 %")
    assert d.chunks_done == 5 and d.step == 2500 and d.ratio == pytest.approx(1.1015)


def test_rising_ratio_continues():
    d = decide(history([1.00, 1.02, 1.04, 1.06, 1.08]), RULE)
    assert not d.done and not d.converged
    assert "over the last 4 evaluations >= 0.5 %" in d.reason


def test_noisy_and_oscillating_ratios_do_not_converge_until_the_budget():
    rng = np.random.default_rng(0)
    noisy = list(1.1 + rng.normal(0, 0.02, size=8))
    assert not decide(history(noisy), RULE).done
    oscillating = [1.05, 1.15] * 4
    assert not decide(history(oscillating), RULE).done
    capped = ConvergenceConfig(min_steps=1000, window=4, tolerance_pct=0.5, max_chunks=8)
    d = decide(history(oscillating), capped)
    assert d.done and not d.converged and d.reason == "budget: 8 chunks"


def test_too_short_histories_wait():
    assert decide([], RULE).reason == "no evaluation yet"
    d = decide(history([1.1, 1.1]), RULE)  # 1000 steps but only 2 evaluations
    assert not d.done and d.reason == "2 evaluations < window 4"
    d = decide(history([1.1] * 6, steps_per_chunk=100), RULE)  # flat but below min_steps
    assert not d.done and d.reason == "only 600 steps < min_steps 1000"


def test_step_and_hour_budgets():
    steps = ConvergenceConfig(min_steps=0, window=4, max_chunks=None, max_total_steps=1500)
    assert decide(history([1.0, 1.1, 1.2]), steps).reason == "budget: 1500 steps"
    hours = ConvergenceConfig(min_steps=0, window=4, max_chunks=None, max_hours=0.5)
    assert decide(history([1.0, 1.1, 1.2], seconds=700), hours).reason == "budget: 0.58 h of training"


def test_the_schedule_end_stops_the_chain():
    records = history([1.0, 1.1])
    records[-1]["stopped_by"] = "total_steps"
    d = decide(records, RULE)
    assert d.done and not d.converged and "total steps" in d.reason


def test_non_finite_ratio_never_converges():
    d = decide(history([1.1, float("nan"), 1.1, 1.1]), RULE)
    assert not d.done and "not finite" in d.reason


def test_a_budget_is_required():
    with pytest.raises(ValueError, match="at least one budget"):
        ConvergenceConfig(max_chunks=None)


def test_state_file(tmp_path):
    d = decide(history([1.1] * 4), RULE)
    write_state(tmp_path, d)
    state = read_state(tmp_path)
    assert state["chunks_done"] == 4 and state["converged"] is True and state["reason"] == d.reason
    assert state["ratio"] == pytest.approx(1.1) and state["improvement_pct"] == pytest.approx(10.0)
    assert json.loads((tmp_path / "state.json").read_text())["done"] is True
