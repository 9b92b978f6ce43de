"""The user's metrics and where they go: ratio = loss_coarse / loss_fine, windows of step losses kept on the
device, one log line per interval and the same numbers to wandb (one run continued across chunks)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from tasks.train_config import TrainConfig

log = logging.getLogger(__name__)


def ratio_metrics(loss_fine: float, loss_coarse: float) -> dict[str, float]:
    """The user's metrics: ratio = loss_coarse / loss_fine (> 1: the foveated pass predicts better)."""
    ratio = loss_coarse / loss_fine if loss_fine > 0 else float("nan")
    return {"loss_fine": loss_fine, "loss_coarse": loss_coarse, "ratio": ratio,
            "improvement_pct": (ratio - 1.0) * 100.0}


class MetricWindow:
    """Sums of the losses over a logging window, kept on the device until the log interval."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.fine = torch.zeros((), device=self.device, dtype=torch.float64)
        self.coarse = torch.zeros((), device=self.device, dtype=torch.float64)
        self.steps = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], samples: int) -> None:
        self.fine += metrics["loss_fine"]
        self.coarse += metrics["loss_coarse"]
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        out = ratio_metrics(self.fine.item() / self.steps, self.coarse.item() / self.steps)  # the only syncs
        out["samples_per_s"] = self.samples / seconds if seconds > 0 else 0.0
        return out


class MetricsSink:
    """One log line per interval, and the same metrics to wandb (one run continued across chunks)."""

    def __init__(self, run: Any | None):
        self.run = run
        self.last_train: dict[str, float] = {}

    @classmethod
    def for_run(cls, run_dir: Path, config: TrainConfig, run_id: str,
                data: dict[str, Any] | None = None) -> "MetricsSink":
        """`data`: what the run trains on (store, frame sampling), kept in the wandb run's config beside the recipe."""
        mode = resolve_wandb_mode(config.wandb.mode)
        if mode == "disabled":
            return cls(None)
        import wandb

        run = wandb.init(
            project=config.wandb.project, entity=config.wandb.entity, id=run_id, resume="allow",
            dir=str(run_dir), mode=mode, config={**config.model_dump(mode="json"), "data": data or {}},
            name=run_dir.name,
            settings=wandb.Settings(console="off", silent=True),
        )
        return cls(run)

    def log_train(self, metrics: dict[str, float], lr: float, step: int) -> None:
        self.last_train = {**metrics, "lr": lr}
        log.info("step %d | loss_fine %.4g | loss_coarse %.4g | ratio %.3f | %.0f samples/s | lr %.2e",
                 step, metrics["loss_fine"], metrics["loss_coarse"], metrics["ratio"],
                 metrics["samples_per_s"], lr)
        self.log({**metrics, "lr": lr}, step)

    def log_pictures(self, paths: list[Path], step: int | None) -> None:
        """The pictures under 'attention', at `step` (None: the run's next step)."""
        if self.run is not None and paths:
            import wandb

            self.run.log({"attention": [wandb.Image(str(p), caption=p.stem) for p in paths]}, step=step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when an API key is configured (env or netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"
