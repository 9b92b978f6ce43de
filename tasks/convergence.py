"""Has the held-out ratio converged? A pure function of the run's history, recorded in RUN_DIR/state.json."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, model_validator

from model.presets import Presets, PresetTable
from storage.run_folder import RunFolder

class ConvergenceConfig(Presets, BaseModel):
    """When the chain of chunks stops: the ratio has settled, or a budget is spent.

    Presets (`ConvergenceConfig.for_preset`): `demo` decides within minutes: a few hundred steps, a short window, a
    tolerance above the +-0.5-1.5 % that its small held-out set moves between evaluations.
    """

    PRESETS: ClassVar[PresetTable] = {
        "full": {},
        "demo": {"min_steps": 300, "window": 3, "tolerance_pct": 1.0, "max_chunks": 8},
    }

    min_steps: int = Field(2_000, ge=0, description="no decision before the run has trained this many steps")
    window: int = Field(4, ge=2, description="evaluations (one per chunk) the change is measured over")
    tolerance_pct: float = Field(0.5, gt=0, description="converged when the held-out ratio moves less than "
                                                        "this many percent over the window")
    loss_tolerance_pct: float = Field(
        1.0, gt=0, description="... and neither held-out loss fell by this many percent over the window: a ratio "
                               "that sits at 1 while both losses still fall has not converged, the fine query "
                               "may not have learnt to look yet")
    max_chunks: int | None = Field(12, ge=1, description="stop after this many chunks in the run folder")
    max_total_steps: int | None = Field(None, ge=1, description="stop once the run has trained this many steps")
    max_hours: float | None = Field(None, gt=0, description="stop once the chunks have trained this many hours")

    @model_validator(mode="after")
    def _needs_a_limit(self) -> "ConvergenceConfig":
        if self.max_chunks is None and self.max_total_steps is None and self.max_hours is None:
            raise ValueError("set at least one budget (max_chunks, max_total_steps or max_hours): "
                             "a ratio that never settles would otherwise train forever")
        return self


@dataclass(frozen=True)
class Decision:
    """What to do after a chunk, and why."""

    done: bool  # stop the chain
    converged: bool  # stopped because the ratio settled (not because a budget ran out)
    reason: str
    chunks_done: int
    step: int
    ratio: float | None
    improvement_pct: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio_change_pct(ratios: list[float]) -> float:
    """Spread of the ratios relative to their mean, in percent: max - min over |mean|."""
    mean = sum(ratios) / len(ratios)
    return (max(ratios) - min(ratios)) / abs(mean) * 100.0 if mean else math.inf


def loss_fall_pct(losses: list[float]) -> float:
    """How much a loss fell from the first to the last evaluation of the window, in percent of the first
    (negative when it rose)."""
    return (losses[0] - losses[-1]) / abs(losses[0]) * 100.0 if losses[0] else -math.inf


LOSSES = ("loss_fine", "loss_coarse")


def decide(history: list[dict[str, Any]], config: ConvergenceConfig) -> Decision:
    """Decide from the history (one record per chunk: step, ratio, improvement_pct, seconds)."""
    chunks = len(history)
    last = history[-1] if history else {}
    step = int(last.get("step", 0))
    ratio = last.get("ratio")
    improvement = last.get("improvement_pct")

    def decision(done: bool, converged: bool, reason: str) -> Decision:
        return Decision(done, converged, reason, chunks, step, ratio, improvement)

    if not history:
        return decision(False, False, "no evaluation yet")
    settled = _settled(history, config)
    if settled is not None and settled[0]:
        return decision(True, True, settled[1])
    if config.max_chunks is not None and chunks >= config.max_chunks:
        return decision(True, False, f"budget: {chunks} chunks")
    if config.max_total_steps is not None and step >= config.max_total_steps:
        return decision(True, False, f"budget: {step} steps")
    hours = sum(float(h.get("seconds", 0.0)) for h in history) / 3600.0
    if config.max_hours is not None and hours >= config.max_hours:
        return decision(True, False, f"budget: {hours:.2f} h of training")
    if last.get("stopped_by") == "total_steps":
        return decision(True, False, f"budget: the schedule's {step} total steps are trained")
    if settled is not None:
        return decision(False, False, settled[1])
    if step < config.min_steps:
        return decision(False, False, f"only {step} steps < min_steps {config.min_steps}")
    return decision(False, False, f"{chunks} evaluations < window {config.window}")


def _settled(history: list[dict[str, Any]], config: ConvergenceConfig) -> tuple[bool, str] | None:
    """(converged?, reason) once a decision can be made, else None."""
    if int(history[-1].get("step", 0)) < config.min_steps or len(history) < config.window:
        return None
    recent = history[-config.window:]
    values = {name: [h.get(name) for h in recent] for name in ("ratio", *LOSSES)}
    broken = [name for name, seq in values.items() if any(v is None or not math.isfinite(v) for v in seq)]
    if broken:
        return False, f"the {broken[0].replace('_', ' ')} is not finite in the last {config.window} evaluations"
    change = ratio_change_pct(values["ratio"])
    over = f"over the last {config.window} evaluations"
    if change >= config.tolerance_pct:
        return False, f"ratio changed {change:.2f} % {over} >= {config.tolerance_pct} %"
    falls = {name: loss_fall_pct(values[name]) for name in LOSSES}
    falling = [name for name in LOSSES if falls[name] >= config.loss_tolerance_pct]
    if falling:
        still = " and ".join(f"{name} fell {falls[name]:.2f} %" for name in falling)
        return False, (f"ratio changed {change:.2f} % {over} < {config.tolerance_pct} %, but {still} {over} "
                       f">= {config.loss_tolerance_pct} %: still learning")
    return True, (f"ratio changed {change:.2f} % {over} < {config.tolerance_pct} %, and the losses stopped falling "
                  f"(loss_fine {0.0 - falls['loss_fine']:+.2f} %, loss_coarse {0.0 - falls['loss_coarse']:+.2f} %; "
                  f"neither fell {config.loss_tolerance_pct} %)")


def read_state(run_dir: str | Path) -> dict[str, Any]:
    return RunFolder(run_dir).read_state()


def write_state(run_dir: str | Path, decision: Decision, **extra: Any) -> dict[str, Any]:
    """state.json: chunks_done, converged, reason, last ratio and improvement_pct (atomically replaced)."""
    state = {**decision.as_dict(), **extra, "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RunFolder(run_dir).write_state(state)
    return state
