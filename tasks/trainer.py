"""The Trainer: the model, its optimizer and schedule, and where the run is. It trains steps until a budget ends
(`fit`), evaluates held-out batches (`evaluate`), and turns itself into a checkpoint and back (`state`,
`load_state`). It knows nothing of stores, run folders or Prefect: the chunk (tasks/training.py) hands it batches,
a checkpoint store and a metrics sink.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from model.config import ModelConfig
from model.foveated import EfficientFoveatedModel
from model.llm import build_llm
from storage.checkpoints import CheckpointError, CheckpointStore
from storage.feature_codec import features_on_device
from storage.loader import LoaderPosition
from tasks.metrics import MetricWindow, MetricsSink, ratio_metrics
from tasks.runtime import progress_bar, resolve_device
from tasks.train_config import TrainConfig

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN/inf; nothing after the last good checkpoint was saved."""


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr_ratio over total_steps (flat at the floor after)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(config: ModelConfig, seed: int) -> EfficientFoveatedModel:
    """The model with parameters initialised from `seed` (the LLM's own seed is in its config)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EfficientFoveatedModel(config, build_llm(config))


def eager():
    """Run a compiled LLM as plain eager code (other batch shapes, no CUDA-graph recording)."""
    return torch.compiler.set_stance("force_eager")


@dataclass
class Budget:
    """When a chunk's loop stops: a stop asked for from outside (a cancelled flow run), the wall clock, the chunk's
    step limit, the run's last step."""

    started: float
    seconds: float
    chunk_end: int | None
    total_steps: int
    stop_requested: Callable[[], bool] | None = None

    @classmethod
    def for_chunk(cls, config: TrainConfig, step: int,
                  stop_requested: Callable[[], bool] | None = None) -> "Budget":
        chunk_end = step + config.max_steps_per_chunk if config.max_steps_per_chunk else None
        return cls(time.monotonic(), config.max_minutes * 60.0, chunk_end, config.total_steps, stop_requested)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stop_reason(self, step: int) -> str | None:
        """'cancelled' (a stop was asked for), 'total_steps', 'steps' (the chunk's limit), 'time', or None to go on.
        Checked between steps, so a stop never cuts an optimizer step in half."""
        if self.stop_requested is not None and self.stop_requested():
            return "cancelled"
        if step >= self.total_steps:
            return "total_steps"
        if self.chunk_end is not None and step >= self.chunk_end:
            return "steps"
        return "time" if self.elapsed() >= self.seconds else None


class Trainer:
    """Trains one model: optimizer steps (split into micro-batches after running out of memory), the loop of a
    timed chunk, held-out evaluation, and the checkpoint dictionary."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        self.model = build_model(config.model, config.seed).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one shape everywhere.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.global_step = 0
        self.position = LoaderPosition()
        self.wandb_run_id = uuid.uuid4().hex[:12]
        self.micro_batches = 1  # each batch runs in this many parts with gradient accumulation (doubled on OOM)
        # The LLM runs as CUDA graphs: each step marks a new graph iteration. Compiled in place, so state_dict
        # keys do not change. Batches keep one shape (the loader drops an epoch's short tail); evaluation runs
        # eager (see `eager`), as its last batch may be short.
        self.graphed = self.device.type == "cuda" and config.compile_llm
        if self.graphed:
            self.model.llm.compile(mode="reduce-overhead")

    def micro_batch(self, batch: int) -> int:
        """Samples per forward pass for a batch of `batch` samples."""
        return -(-batch // self.micro_batches)

    @property
    def autocast(self) -> torch.autocast:
        use_bf16 = self.config.bf16 and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # ---- one step ------------------------------------------------------------------------------------------

    def step(self, features: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on the batch; out of memory, split it in twice as many parts and try it again.

        The parts' gradients add up to the whole batch's (each part's mean loss is weighted by its share), so the
        effective batch, and with it the recipe, is unchanged; the split is kept for the rest of the run.
        """
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                metrics = self._backward(features, latents)
                break
            except torch.OutOfMemoryError as err:
                self._split_after_oom(features.shape[0], err)
        self._apply_gradients()
        self.global_step += 1
        return metrics

    def _backward(self, features: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward and backward passes over the micro-batches; the batch's metrics, weighted by share."""
        batch = features.shape[0]
        totals: dict[str, torch.Tensor] = {}
        for part_features, part_latents in zip(features.tensor_split(self.micro_batches),
                                               latents.tensor_split(self.micro_batches)):
            if part_features.shape[0] == 0:  # more parts than samples (a batch size lowered since the split)
                continue
            share = part_features.shape[0] / batch
            if self.graphed:
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast:
                loss, metrics = self.model(part_features, part_latents)
            self.scaler.scale(loss * share if share < 1 else loss).backward()
            for name, value in metrics.items():
                totals[name] = totals[name] + value * share if name in totals else value * share
        return totals

    def _apply_gradients(self) -> None:
        """Clip the gradient norm, step the optimizer and the lr schedule."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _split_after_oom(self, batch: int, err: torch.OutOfMemoryError) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.micro_batches >= batch:
            raise torch.OutOfMemoryError(
                f"out of memory at step {self.global_step} even with a micro-batch of one sample: the model does "
                f"not fit this device (free the GPU, or use a smaller model preset)"
            ) from err
        before = self.micro_batch(batch)
        self.micro_batches = min(batch, self.micro_batches * 2)
        log.warning("out of memory at step %d with micro-batch %d: now %d micro-batches of %d with gradient "
                    "accumulation (effective batch %d unchanged)", self.global_step, before, self.micro_batches,
                    self.micro_batch(batch), batch)

    # ---- the loop ------------------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Batch], checkpoints: CheckpointStore, sink: MetricsSink, budget: Budget) -> str:
        """Train until the budget ends, checkpointing every checkpoint_every steps. Returns why it stopped:
        'time', 'steps' (the chunk's limit), 'total_steps' or 'cancelled' (budget.stop_requested)."""
        stopped = budget.stop_reason(self.global_step)
        if stopped in ("total_steps", "cancelled"):
            return stopped
        window = MetricWindow(self.device)
        self.model.train()
        batch_iter: Iterator[Batch] = iter(batches)
        with progress_bar(total=int(budget.seconds), unit="s", desc=f"training from step {self.global_step}") as bar:
            while True:
                batch = next(batch_iter)
                features = features_on_device(batch, self.device)  # (B, T, N, D) float16
                latents = batch["latents"].to(self.device, non_blocking=True)  # (B, T, C, S, S) float16
                window.add(self.step(features, latents), features.shape[0])
                self.position = self.position.advanced(batch)
                if self.global_step % self.config.log_every == 0:
                    self._log_window(window, checkpoints, sink)
                    bar.set_postfix(step=self.global_step, ratio=f"{sink.last_train['ratio']:.3f}", refresh=False)
                bar.update(min(int(budget.elapsed()), bar.total) - bar.n)
                if self.global_step % self.config.checkpoint_every == 0:
                    self.save(checkpoints)
                stopped = budget.stop_reason(self.global_step)
                if stopped:
                    return stopped

    def _log_window(self, window: MetricWindow, checkpoints: CheckpointStore, sink: MetricsSink) -> None:
        """The window's mean losses to the sink; a non-finite mean stops the run before anything is saved."""
        summary = window.summary()
        if not (math.isfinite(summary["loss_fine"]) and math.isfinite(summary["loss_coarse"])):
            self.raise_diverged(checkpoints, f"the mean loss of steps {self.global_step - window.steps + 1}-"
                                             f"{self.global_step} is {summary['loss_fine']} (fine), "
                                             f"{summary['loss_coarse']} (coarse)")
        sink.log_train(summary, self.scheduler.get_last_lr()[0], self.global_step)
        window.reset()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """loss_fine, loss_coarse, ratio, improvement_pct on held-out batches (sample-weighted means)."""
        self.model.eval()
        fine = coarse = 0.0
        samples = 0
        for batch in batches:
            # In the training's micro-batches: a batch that ran out of memory in training may not fit here either.
            for features, latents in zip(features_on_device(batch, self.device).tensor_split(self.micro_batches),
                                         batch["latents"].tensor_split(self.micro_batches)):
                if features.shape[0] == 0:
                    continue
                with self.autocast, eager():
                    _, metrics = self.model(features.to(self.device), latents.to(self.device))
                n = features.shape[0]
                fine += metrics["loss_fine"].item() * n
                coarse += metrics["loss_coarse"].item() * n
                samples += n
        self.model.train()
        if samples == 0:
            return {"loss_fine": float("nan"), "loss_coarse": float("nan"), "ratio": float("nan"),
                    "improvement_pct": float("nan"), "eval_samples": 0}
        return {**ratio_metrics(fine / samples, coarse / samples), "eval_samples": samples}

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save(self, checkpoints: CheckpointStore) -> Path:
        """Checkpoint, unless a weight is NaN/inf: a diverged model is never saved over the good ones.

        One device sync per checkpoint (the check of every parameter), nothing per step.
        """
        params = [p.detach() for p in self.model.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        if not bool(finite):
            self.raise_diverged(checkpoints, "some weights are NaN or inf")
        return checkpoints.save(self.state(), self.global_step)

    def raise_diverged(self, checkpoints: CheckpointStore, what: str) -> None:
        latest = checkpoints.latest()
        last_good = latest.name if latest else "the start"
        raise TrainingDivergedError(
            f"training diverged at step {self.global_step}: {what}; nothing was saved after {last_good}. Lower the "
            f"learning rate (lr {self.config.lr:g}) or raise warmup, or check the store for rows with NaN/inf "
            f"values, then run again: it resumes from {last_good}"
        )

    def state(self) -> dict[str, Any]:
        """A checkpoint: tensors and plain data only, so that it loads with weights_only=True."""
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.global_step, "loader": self.position.to_dict(), "rng": rng,
            "config": self.config.model_dump(mode="json"), "wandb_run_id": self.wandb_run_id,
            "micro_batches": self.micro_batches,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        # Read through the current ModelConfig, so that a field added since (with its default) is no difference.
        saved = ModelConfig.model_validate(state["config"]["model"]).model_dump(mode="json")
        if saved != self.config.model.model_dump(mode="json"):
            raise CheckpointError(
                "the checkpoint was trained with another model config; use a new --run-dir or the same --preset"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["step"])
        self.position = LoaderPosition.from_dict(state["loader"])
        self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id
        self.micro_batches = int(state.get("micro_batches", 1))  # an earlier chunk ran out of memory: keep its split
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def seed(self) -> None:
        """A fresh run's data order and dropout: from the config's seed."""
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
