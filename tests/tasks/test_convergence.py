import json

import numpy as np
import pytest

from tasks.convergence import ConvergenceConfig, decide, read_state, write_state

RULE = ConvergenceConfig(min_steps=1000, window=4, tolerance_pct=0.5, max_chunks=20)


def history(ratios, steps_per_chunk=500, seconds=600.0, fine=None):
    """Chunk records; loss_fine follows `fine` (flat at 0.4 by default) and loss_coarse = ratio * loss_fine."""
    fine = fine or [0.4] * len(ratios)
    return [{"chunk": i + 1, "step": (i + 1) * steps_per_chunk, "ratio": r, "improvement_pct": (r - 1) * 100,
             "loss_fine": f, "loss_coarse": r * f, "seconds": seconds} for i, (r, f) in enumerate(zip(ratios, fine))]


def test_flat_ratio_converges_with_a_readable_reason():
    d = decide(history([1.05, 1.100, 1.101, 1.102, 1.1015]), RULE)
    assert d.done and d.converged
    assert d.reason == ("ratio changed 0.18 % over the last 4 evaluations < 0.5 %, and the losses stopped falling "
                        "(loss_fine +0.00 %, loss_coarse +0.14 %; neither fell 1.0 %)")
    assert d.chunks_done == 5 and d.step == 2500 and d.ratio == pytest.approx(1.1015)


def test_a_flat_start_with_falling_losses_continues_and_says_why():
    """The ratio sits at 1.00 while both losses fall (the fine query has not learnt to look yet): not converged."""
    falling = [0.60, 0.55, 0.50, 0.46, 0.43]
    d = decide(history([1.000, 1.001, 1.000, 1.002, 1.001], fine=falling), RULE)
    assert not d.done and not d.converged
    assert d.reason == ("ratio changed 0.20 % over the last 4 evaluations < 0.5 %, but loss_fine fell 21.82 % and "
                        "loss_coarse fell 21.82 % over the last 4 evaluations >= 1.0 %: still learning")
    # the same flat ratio once the losses have stopped falling converges: the loss rule is what held it back
    flat = decide(history([1.000, 1.001, 1.000, 1.002, 1.001], fine=[0.60, 0.43, 0.431, 0.429, 0.4305]), RULE)
    assert flat.done and flat.converged and "the losses stopped falling" in flat.reason


def test_one_loss_still_falling_is_enough_to_continue():
    records = history([1.10, 1.10, 1.10, 1.10])
    for i, record in enumerate(records):  # coarse falls 3 % while fine falls with it: the ratio stays put
        record["loss_coarse"] = 0.44 * (1 - 0.01 * i)
        record["loss_fine"] = record["loss_coarse"] / 1.10
    records[-1]["loss_fine"] = records[0]["loss_fine"]  # ... except the last fine, back where it started
    records[-1]["ratio"] = records[-1]["loss_coarse"] / records[-1]["loss_fine"]
    d = decide(records, ConvergenceConfig(min_steps=0, window=4, tolerance_pct=5.0, max_chunks=20))
    assert not d.done and d.reason.endswith("but loss_coarse fell 3.00 % over the last 4 evaluations >= 1.0 %: "
                                            "still learning")


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


def test_non_finite_ratio_or_loss_never_converges():
    d = decide(history([1.1, float("nan"), 1.1, 1.1]), RULE)
    assert not d.done and d.reason == "the ratio is not finite in the last 4 evaluations"
    records = history([1.1] * 4)
    del records[1]["loss_fine"]
    d = decide(records, RULE)
    assert not d.done and d.reason == "the loss fine is not finite in the last 4 evaluations"


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
