"""The Trainer: the model, its optimizer and schedule, and where the run is. It trains steps until a budget ends
(`fit`), evaluates held-out batches (`evaluate`), and turns itself into a checkpoint and back (`state`,
`load_state`). It knows nothing of stores, run folders or Prefect: the chunk (tasks/training.py) hands it batches,
a checkpoint store and a metrics sink.
"""

from __future__ import annotations

import contextlib
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
from tasks.ranks import Ranks
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
    timed chunk, held-out evaluation, and the checkpoint dictionary.

    With `ranks` of several processes (tasks/distributed.py) each rank trains on its slice of every batch through
    DistributedDataParallel, which averages the gradients; the ranks agree on when to stop and on the micro-batch
    split, reduce the logged losses and the evaluation, and only rank 0 writes checkpoints."""

    def __init__(self, config: TrainConfig, ranks: Ranks | None = None):
        self.config = config
        self.ranks = ranks or Ranks()
        self.device = self.ranks.device or torch.device(resolve_device(config.device))
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
        self.net = self._wrap()  # what a step calls: the model, or its DDP wrapper

    def _wrap(self) -> torch.nn.Module:
        """With several ranks, the model in DDP: parameters and buffers broadcast from rank 0 here, gradients
        averaged over the ranks in the backward pass. The buffers (rotary frequencies) are constants: not synced
        in a forward, which then runs no collective, so that one rank may run out of memory in it alone."""
        if not self.ranks.distributed:
            return self.model
        return torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)

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

        Several ranks agree on the split before DDP's gradient all-reduce (the last part's backward pass): a rank
        out of memory before that point splits on every rank; one out of memory inside that pass cannot, and ends
        the chunk (see `_synced_backward`).
        """
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            last_loss, metrics, failed = None, {}, None
            try:
                last_loss, metrics = self._forward_parts(features, latents)
                if not self.ranks.distributed:
                    self.scaler.scale(last_loss).backward()
            except torch.OutOfMemoryError as err:
                failed = err
            if self.ranks.any(failed is not None):  # every rank gets here, out of memory or not
                self._split_after_oom(features.shape[0], failed)
                last_loss = failed = None  # the abandoned pass's graph (and traceback) go with them
                if self.ranks.distributed:
                    # A rank whose last forward pass ran has a DDP reducer waiting for that pass's backward: a
                    # new wrapper (all ranks together, parameters unchanged) starts the retry from a clean state.
                    self.net = self._wrap()
                continue
            if self.ranks.distributed:
                self._synced_backward(last_loss)
            break
        self._apply_gradients()
        self.global_step += 1
        return metrics

    def _forward_parts(self, features: torch.Tensor,
                       latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward passes over the micro-batches but the last, then the last one's forward: its loss
        (weighted by its share, backward pass still to do) and the batch's metrics, weighted by share."""
        batch = features.shape[0]
        # more parts than samples (a batch size lowered since the split): the empty ones are left out
        parts = [(f, l) for f, l in zip(features.tensor_split(self.micro_batches),
                                        latents.tensor_split(self.micro_batches)) if f.shape[0] > 0]
        totals: dict[str, torch.Tensor] = {}
        no_sync = self.net.no_sync() if self.ranks.distributed else contextlib.nullcontext()
        with no_sync:  # DDP accumulates these parts' gradients locally; the last part's backward all-reduces
            for part_features, part_latents in parts[:-1]:
                self.scaler.scale(self._forward_part(part_features, part_latents, batch, totals)).backward()
        return self._forward_part(*parts[-1], batch, totals), totals

    def _forward_part(self, features: torch.Tensor, latents: torch.Tensor, batch: int,
                      totals: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's forward pass: its loss weighted by its share of the batch; its metrics into totals."""
        share = features.shape[0] / batch
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast:
            loss, metrics = self.net(features, latents)
        for name, value in metrics.items():
            totals[name] = totals[name] + value * share if name in totals else value * share
        return loss * share if share < 1 else loss

    def _synced_backward(self, loss: torch.Tensor) -> None:
        """The last part's backward pass, in which DDP all-reduces the gradients. Out of memory here, the other
        ranks wait in the all-reduce: this rank fails, the launcher stops the others, the chunk ends with an error
        and the next resumes from the last checkpoint."""
        try:
            self.scaler.scale(loss).backward()
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory on rank {self.ranks.rank} at step {self.global_step} in the backward pass that "
                f"all-reduces the gradients, where the ranks cannot agree on a smaller micro-batch; the chunk "
                f"stops and the next one resumes from the last checkpoint. Lower --batch-size, or run a chunk "
                f"with --nproc 1 to find the split (it is kept in the checkpoint)") from err

    def _apply_gradients(self) -> None:
        """Clip the gradient norm, step the optimizer and the lr schedule."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _split_after_oom(self, batch: int, err: torch.OutOfMemoryError | None) -> None:
        """Twice as many micro-batches (err: this rank's error; None on a rank that fitted but whose peer did not)."""
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
        log.warning("out of memory%s at step %d with micro-batch %d: now %d micro-batches of %d with gradient "
                    "accumulation (effective batch %d unchanged)", "" if err else " on another rank",
                    self.global_step, before, self.micro_batches, self.micro_batch(batch),
                    batch * self.ranks.world)

    # ---- the loop ------------------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Batch], checkpoints: CheckpointStore, sink: MetricsSink, budget: Budget) -> str:
        """Train until the budget ends, checkpointing every checkpoint_every steps. Returns why it stopped:
        'time', 'steps' (the chunk's limit), 'total_steps' or 'cancelled' (budget.stop_requested)."""
        stopped = self.ranks.agree_stop(budget.stop_reason(self.global_step))
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
                window.add(self.step(features, latents), features.shape[0] * self.ranks.world)
                self.position = self.position.advanced(batch)
                if self.global_step % self.config.log_every == 0:
                    self._log_window(window, checkpoints, sink)
                    bar.set_postfix(step=self.global_step, ratio=f"{sink.last_train['ratio']:.3f}", refresh=False)
                bar.update(min(int(budget.elapsed()), bar.total) - bar.n)
                if self.global_step % self.config.checkpoint_every == 0:
                    self.save(checkpoints)
                stopped = self.ranks.agree_stop(budget.stop_reason(self.global_step))
                if stopped:
                    return stopped

    def _log_window(self, window: MetricWindow, checkpoints: CheckpointStore, sink: MetricsSink) -> None:
        """The window's mean losses to the sink; a non-finite mean stops the run before anything is saved.
        Averaged over the ranks first (equal slices: the global batch's mean), so every rank stops together."""
        self.ranks.average_(window.fine, window.coarse)
        summary = window.summary()
        if not (math.isfinite(summary["loss_fine"]) and math.isfinite(summary["loss_coarse"])):
            self.raise_diverged(checkpoints, f"the mean loss of steps {self.global_step - window.steps + 1}-"
                                             f"{self.global_step} is {summary['loss_fine']} (fine), "
                                             f"{summary['loss_coarse']} (coarse)")
        sink.log_train(summary, self.scheduler.get_last_lr()[0], self.global_step)
        window.reset()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """loss_fine, loss_coarse, ratio, improvement_pct on held-out batches (sample-weighted means). Several
        ranks each evaluate their own held-out rows; the sums of loss * samples and of samples are added up."""
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
        fine, coarse, samples = self.ranks.sum([fine, coarse, samples])
        if samples == 0:
            return {"loss_fine": float("nan"), "loss_coarse": float("nan"), "ratio": float("nan"),
                    "improvement_pct": float("nan"), "eval_samples": 0}
        return {**ratio_metrics(fine / samples, coarse / samples), "eval_samples": int(samples)}

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save(self, checkpoints: CheckpointStore) -> Path:
        """Checkpoint, unless a weight is NaN/inf: a diverged model is never saved over the good ones.

        One device sync per checkpoint (the check of every parameter), nothing per step. Every rank checks (their
        weights are the same, so they raise together); rank 0 alone writes.
        """
        params = [p.detach() for p in self.model.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        if not bool(finite):
            self.raise_diverged(checkpoints, "some weights are NaN or inf")
        if not self.ranks.is_main:
            return checkpoints.path_for(self.global_step)
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
