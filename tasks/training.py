"""One timed training chunk: resume from the latest checkpoint, train until the wall-clock budget, checkpoint,
evaluate on held-out rows, append to history.jsonl.

Plain functions; the Prefect tasks that wrap them live in tasks/train_tasks.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, Field

from model.config import ModelConfig
from model.encoders import EncoderConfig, describe_encoders
from model.foveated import EfficientFoveatedModel
from model.llm import build_llm
from storage.checkpoints import CheckpointError, CheckpointStore
from storage.loader import LoaderConfig, LoaderPosition, eval_batches, make_train_loader, split_rows
from storage.runlock import RunLock
from storage.store import FeatureStore
from tasks.attention import save_attention_pictures
from tasks.decode import describe_window
from tasks.runtime import progress_bar, resolve_device

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"


class StoreMismatchError(ValueError):
    """The store was not made for this training config; the message lists every difference."""


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN/inf; nothing after the last good checkpoint was saved."""


class WandbConfig(BaseModel):
    """Where metrics go besides the log."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when an API key is configured, else offline files in the run folder"
    )
    project: str = Field("foveated-vlm-efficient", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (team or user); None = the default")


class TrainConfig(BaseModel):
    """The seed recipe, plus what a resumable, timed chunk needs."""

    preset: Literal["demo", "full"] = Field("full", description="model size and the encoders the store must have")
    model: ModelConfig = Field(default_factory=ModelConfig, description="EfficientFoveatedModel settings")
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="batches, frames, held-out rows")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(500, ge=0, description="linear warm-up steps")
    total_steps: int = Field(50_000, ge=1, description="steps of the whole run (the cosine schedule's length, "
                                                        "fixed across chunks)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine ends at this fraction of lr")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    bf16: bool = Field(True, description="bf16 autocast on a GPU (ignored on a CPU)")
    compile_llm: bool = Field(True, description="on a GPU, torch.compile the LLM with CUDA graphs "
                                                "(reduce-overhead): several times faster at batch 64 on an H100")
    log_every: int = Field(25, ge=1, description="steps between metric lines (and .item() calls)")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints inside a chunk")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept in the run folder")
    max_minutes: float = Field(120.0, gt=0, description="wall-clock budget of one chunk, checked by the loop")
    max_steps_per_chunk: int | None = Field(None, ge=1, description="stop a chunk after this many steps too")
    eval_batches: int = Field(8, ge=1, description="held-out batches evaluated at the end of each chunk")
    attention_videos: int = Field(3, ge=0, description="held-out videos whose attention is drawn after each chunk")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:1, ...")
    seed: int = Field(0, description="seed of the model's initialisation and of the data order")
    expect_dino: str | None = Field(None, description="DINOv2 id the store must have (None: the preset's)")
    expect_vae: str | None = Field(None, description="VAE id the store must have (None: the preset's)")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="metrics logging")

    @classmethod
    def preset_config(cls, name: Literal["demo", "full"], **overrides: Any) -> "TrainConfig":
        """full: the seed recipe; demo: a tiny model and a short schedule that a CPU runs in minutes."""
        if name == "full":
            base: dict[str, Any] = dict(preset="full", model=ModelConfig.preset("full"))
        else:
            base = dict(
                preset="demo", model=ModelConfig.preset("demo"),
                # a fifth of the videos held out: with 1 in 20 the demo's ratio would rest on one or two videos
                loader=LoaderConfig(batch_size=8, buffer_chunks=4, num_workers=0, eval_fraction=0.2),
                lr=1e-3, warmup_steps=20, total_steps=600, log_every=10, checkpoint_every=100,
                max_minutes=1.0, eval_batches=4,
            )
        base.update(overrides)
        return cls(**base)

    def expected_encoders(self) -> dict[str, str]:
        encoders = EncoderConfig(preset=self.preset)
        return {"dino": self.expect_dino or encoders.dino_id, "vae": self.expect_vae or encoders.vae_id}


# ---- checks --------------------------------------------------------------------------------------------


def check_store(store: FeatureStore, config: TrainConfig) -> None:
    """Refuse a store whose attributes do not match the config, listing every difference."""
    m = config.model
    attrs = store.attrs
    want = {
        "tokens": m.num_tokens, "feature_dim": m.feature_dim,
        "latent_shape": [m.latent_channels, m.latent_size, m.latent_size],
        "dino": config.expected_encoders()["dino"], "vae": config.expected_encoders()["vae"],
    }
    have = {
        "tokens": attrs.get("tokens"), "feature_dim": attrs.get("feature_dim"),
        "latent_shape": list(attrs.get("latent_shape", [])),
        "dino": attrs.get("dino", {}).get("id"), "vae": attrs.get("vae", {}).get("id"),
    }
    diffs = [f"{k}: store has {have[k]!r}, config wants {want[k]!r}" for k in want if have[k] != want[k]]
    for name in ("dino_features", "latents"):  # the loader reads float16 bytes straight from the chunk files
        dtype = str(store.group[name].dtype)
        if dtype != "float16":
            diffs.append(f"{name} dtype: store has {dtype}, this code reads float16")
    if attrs.get("frames", 0) < config.loader.frames:
        diffs.append(f"frames: store has {attrs.get('frames')}, config samples {config.loader.frames}")
    if diffs:
        raise StoreMismatchError(
            f"store {store.path} does not match the training config ({'; '.join(diffs)}); "
            f"use the store made with this preset (--preset) or set expect_dino/expect_vae"
        )


# ---- schedule and state --------------------------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr_ratio over total_steps (flat at the floor after)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Trainer:
    """Everything a chunk trains and checkpoints."""

    config: TrainConfig
    device: torch.device
    model: EfficientFoveatedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    position: LoaderPosition = field(default_factory=LoaderPosition)
    wandb_run_id: str = ""
    graphed: bool = False  # the LLM runs as CUDA graphs: each step marks a new graph iteration
    micro_batches: int = 1  # each batch runs in this many parts with gradient accumulation (doubled on OOM)

    def micro_batch(self, batch: int) -> int:
        """Samples per forward pass for a batch of `batch` samples."""
        return -(-batch // self.micro_batches)

    @property
    def autocast(self) -> torch.autocast:
        use_bf16 = self.config.bf16 and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def state(self) -> dict[str, Any]:
        """A checkpoint: tensors and plain data only, so that it loads with weights_only=True."""
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "loader": self.position.to_dict(), "rng": rng,
            "config": self.config.model_dump(mode="json"), "wandb_run_id": self.wandb_run_id,
            "micro_batches": self.micro_batches,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        saved_model = state["config"]["model"]
        if saved_model != self.config.model.model_dump(mode="json"):
            raise CheckpointError(
                "the checkpoint was trained with another model config; use a new --run-dir or the same --preset"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.position = LoaderPosition.from_dict(state["loader"])
        self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id
        self.micro_batches = int(state.get("micro_batches", 1))  # an earlier chunk ran out of memory: keep its split
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


def build_model(config: ModelConfig, seed: int) -> EfficientFoveatedModel:
    """The model with parameters initialised from `seed` (the LLM's own seed is in its config)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EfficientFoveatedModel(config, build_llm(config))


def build_trainer(config: TrainConfig) -> Trainer:
    device = torch.device(resolve_device(config.device))
    model = build_model(config.model, config.seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one shape everywhere.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    graphed = device.type == "cuda" and config.compile_llm
    if graphed:
        # Compiled in place, so state_dict keys do not change. Batches keep one shape (the loader drops an
        # epoch's short tail); evaluation runs eager (see `eager`), as its last batch may be short.
        model.llm.compile(mode="reduce-overhead")
    return Trainer(config, device, model, optimizer, scheduler, scaler, wandb_run_id=uuid.uuid4().hex[:12],
                   graphed=graphed)


# ---- metrics -------------------------------------------------------------------------------------------


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


# ---- the chunk -----------------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    """What a chunk did and where it left the run."""

    chunk: int
    start_step: int
    step: int
    seconds: float
    samples_per_s: float
    train: dict[str, float]
    eval: dict[str, float]
    checkpoint: str
    wandb_run_id: str
    stopped_by: str
    pictures: list[str]

    resumed_from: str | None = None
    micro_batch: int = 0  # samples per forward pass; below the batch size after an out-of-memory split

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The chunk records of a run; a line torn by a kill during its append is skipped with a warning."""
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not a complete record (a write cut short?); skipped", path, number)
    return records


def append_history(run_dir: str | Path, record: dict[str, Any]) -> None:
    path = Path(run_dir) / HISTORY
    with open(path, "a+b") as f:
        if f.tell() > 0:  # a kill during an earlier append may have left a line without its newline
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def train_chunk(store_path: str, run_dir: str | Path, config: TrainConfig, resume: str | None = None,
                metrics_sink: "MetricsSink | None" = None) -> ChunkResult:
    """Train one chunk under the run folder's lock and return what it did."""
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        return _train_chunk_locked(store_path, run_dir, config, resume, metrics_sink)


def _train_chunk_locked(store_path: str, run_dir: Path, config: TrainConfig, resume: str | None,
                        metrics_sink: "MetricsSink | None") -> ChunkResult:
    store = FeatureStore.open(store_path)
    check_store(store, config)
    train_rows, eval_rows = split_rows(store.read_column("video_id"), store.read_status(),
                                       config.loader.eval_fraction)
    if len(train_rows) < config.loader.batch_size:
        raise StoreMismatchError(f"store {store_path} has {len(train_rows)} training rows, fewer than one batch "
                                 f"of {config.loader.batch_size}: precompute more videos or lower the batch size")
    checkpoints = CheckpointStore(run_dir, keep=config.keep_checkpoints)
    trainer = build_trainer(config)
    # An explicit --resume must load as asked; the run folder's own latest falls back past a damaged one.
    loaded = (checkpoints.load(resume, map_location="cpu"), Path(resume)) if resume else checkpoints.load_latest()
    source = str(loaded[1]) if loaded else None
    if loaded is not None:
        trainer.load_state(loaded[0])
        log.info("resumed from %s at step %d", source, trainer.step)
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
    chunk = len(read_history(run_dir)) + 1
    sampling = store_sampling(store)
    log.info("store %s: %s", store_path, sampling["described"])
    sink = metrics_sink or MetricsSink.for_run(run_dir, config, trainer.wandb_run_id,
                                               data={"store": store_path, "sampling": sampling})
    start_step = trainer.step
    started = time.monotonic()
    stopped_by = _train_steps(trainer, store_path, train_rows, checkpoints, sink, started)
    seconds = time.monotonic() - started
    # Saved once per step: the loop may just have saved this one, or a resumed finished run has it already.
    saved = trainer.step in checkpoints.steps()
    checkpoint = checkpoints.path_for(trainer.step) if saved else save_if_finite(trainer, checkpoints)
    evaluation = evaluate(trainer, store_path, eval_rows)
    with eager():
        pictures = save_attention_pictures(
                trainer.model, store_path, [int(r) for r in eval_rows[:config.attention_videos]], config.loader.frames,
            run_dir / "attention", f"chunk-{chunk:03d}", trainer.device,
        )
    sink.log_pictures(pictures, trainer.step)
    samples = (trainer.step - start_step) * config.loader.batch_size
    result = ChunkResult(
        chunk=chunk, start_step=start_step, step=trainer.step, seconds=round(seconds, 3),
        samples_per_s=samples / seconds if seconds > 0 else 0.0, train=sink.last_train, eval=evaluation,
        checkpoint=str(checkpoint), wandb_run_id=trainer.wandb_run_id, stopped_by=stopped_by,
        pictures=[str(p) for p in pictures], resumed_from=source,
        micro_batch=trainer.micro_batch(config.loader.batch_size),
    )
    append_history(run_dir, {"chunk": chunk, "step": trainer.step, **evaluation,
                             "train": sink.last_train, "samples_per_s": result.samples_per_s,
                             "seconds": result.seconds, "stopped_by": stopped_by,
                             "wandb_run_id": trainer.wandb_run_id, "pictures": result.pictures,
                             "micro_batch": result.micro_batch, "sampling": sampling,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    sink.log({f"eval/{k}": v for k, v in evaluation.items()}, trainer.step)
    if metrics_sink is None:
        sink.close()
    return result


def store_sampling(store: FeatureStore) -> dict[str, Any]:
    """Which frames of each video the store's rows keep and how far apart they are: a ratio measured on frames
    0.1 s apart (the seed's window) and one on frames seconds apart are two experiments."""
    sampling = dict(store.attrs.get("sampling") or {"mode": "unknown"})
    sampling["median_interval_s"] = store.frame_spacing()["median_s"]
    apart = (f"{sampling['median_interval_s']:.3f} s apart (median)" if sampling["median_interval_s"] is not None
             else "spacing unknown")
    sampling["described"] = f"{describe_window(sampling)}, {apart}"
    return sampling


def _train_steps(trainer: Trainer, store_path: str, train_rows, checkpoints: CheckpointStore,
                 sink: "MetricsSink", started: float) -> str:
    """The loop. Returns why it stopped: 'time', 'steps' (chunk limit) or 'total_steps'."""
    config, device = trainer.config, trainer.device
    budget_s = config.max_minutes * 60.0
    chunk_end = trainer.step + config.max_steps_per_chunk if config.max_steps_per_chunk else None
    if trainer.step >= config.total_steps:
        return "total_steps"
    loader = make_train_loader(store_path, train_rows, config.loader, trainer.position,
                               pin_memory=device.type == "cuda")
    window = MetricWindow(device)
    trainer.model.train()
    batches: Iterator[dict[str, Any]] = iter(loader)
    with progress_bar(total=int(budget_s), unit="s", desc=f"training from step {trainer.step}") as bar:
        return _loop(trainer, batches, checkpoints, sink, window, started, budget_s, chunk_end, bar)


def _loop(trainer: Trainer, batches: Iterator[dict[str, Any]], checkpoints: CheckpointStore, sink: "MetricsSink",
          window: MetricWindow, started: float, budget_s: float, chunk_end: int | None, bar: Any) -> str:
    config, device = trainer.config, trainer.device
    while True:
        batch = next(batches)
        features = batch["features"].to(device, non_blocking=True)  # (B, T, N, D) float16, cast on the device
        latents = batch["latents"].to(device, non_blocking=True)  # (B, T, C, S, S) float16
        metrics = _optimizer_step(trainer, features, latents)
        trainer.step += 1
        trainer.position = trainer.position.advanced(batch)
        window.add(metrics, features.shape[0])
        if trainer.step % config.log_every == 0:
            summary = window.summary()
            if not (math.isfinite(summary["loss_fine"]) and math.isfinite(summary["loss_coarse"])):
                raise_diverged(trainer, checkpoints, f"the mean loss of steps {trainer.step - window.steps + 1}-"
                                                     f"{trainer.step} is {summary['loss_fine']} (fine), "
                                                     f"{summary['loss_coarse']} (coarse)")
            sink.log_train(summary, trainer.scheduler.get_last_lr()[0], trainer.step)
            bar.set_postfix(step=trainer.step, ratio=f"{sink.last_train['ratio']:.3f}", refresh=False)
            window.reset()
        bar.update(min(int(time.monotonic() - started), bar.total) - bar.n)
        if trainer.step % config.checkpoint_every == 0:
            save_if_finite(trainer, checkpoints)
        if trainer.step >= config.total_steps:
            return "total_steps"
        if chunk_end is not None and trainer.step >= chunk_end:
            return "steps"
        if time.monotonic() - started >= budget_s:
            return "time"


def _optimizer_step(trainer: Trainer, features: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer step on the batch; out of memory, split it in twice as many parts and try the batch again.

    The parts' gradients add up to the whole batch's (each part's mean loss is weighted by its share), so the
    effective batch, and with it the recipe, is unchanged; the split is kept for the rest of the run.
    """
    while True:
        try:
            return _accumulate(trainer, features, latents)
        except torch.OutOfMemoryError as err:
            trainer.optimizer.zero_grad(set_to_none=True)
            if trainer.device.type == "cuda":
                torch.cuda.empty_cache()
            batch = features.shape[0]
            if trainer.micro_batches >= batch:
                raise torch.OutOfMemoryError(
                    f"out of memory at step {trainer.step} even with a micro-batch of one sample: the model does "
                    f"not fit this device (free the GPU, or use a smaller model preset)"
                ) from err
            before = trainer.micro_batch(batch)
            trainer.micro_batches = min(batch, trainer.micro_batches * 2)
            log.warning("out of memory at step %d with micro-batch %d: now %d micro-batches of %d with gradient "
                        "accumulation (effective batch %d unchanged)", trainer.step, before, trainer.micro_batches,
                        trainer.micro_batch(batch), batch)


def _accumulate(trainer: Trainer, features: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    config, model = trainer.config, trainer.model
    trainer.optimizer.zero_grad(set_to_none=True)
    batch = features.shape[0]
    totals: dict[str, torch.Tensor] = {}
    for part_features, part_latents in zip(features.tensor_split(trainer.micro_batches),
                                           latents.tensor_split(trainer.micro_batches)):
        if part_features.shape[0] == 0:  # more parts than samples (a batch size lowered since the split)
            continue
        share = part_features.shape[0] / batch
        if trainer.graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with trainer.autocast:
            loss, metrics = model(part_features, part_latents)
        trainer.scaler.scale(loss * share if share < 1 else loss).backward()
        for name, value in metrics.items():
            totals[name] = totals[name] + value * share if name in totals else value * share
    trainer.scaler.unscale_(trainer.optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    return totals


def save_if_finite(trainer: Trainer, checkpoints: CheckpointStore) -> Path:
    """Checkpoint, unless a weight is NaN/inf: a diverged model is never saved over the good ones.

    One device sync per checkpoint (the check of every parameter), nothing per step.
    """
    params = [p.detach() for p in trainer.model.parameters()]
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
    if not bool(finite):
        raise_diverged(trainer, checkpoints, "some weights are NaN or inf")
    return checkpoints.save(trainer.state(), trainer.step)


def raise_diverged(trainer: Trainer, checkpoints: CheckpointStore, what: str) -> None:
    latest = checkpoints.latest()
    last_good = latest.name if latest else "the start"
    raise TrainingDivergedError(
        f"training diverged at step {trainer.step}: {what}; nothing was saved after {last_good}. Lower the "
        f"learning rate (lr {trainer.config.lr:g}) or raise warmup, or check the store for rows with NaN/inf "
        f"values, then run again: it resumes from {last_good}"
    )


def eager():
    """Run a compiled LLM as plain eager code (other batch shapes, no CUDA-graph recording)."""
    return torch.compiler.set_stance("force_eager")


@torch.no_grad()
def evaluate(trainer: Trainer, store_path: str, eval_rows) -> dict[str, float]:
    """loss_fine, loss_coarse, ratio, improvement_pct on held-out rows (sample-weighted means)."""
    model, device = trainer.model, trainer.device
    model.eval()
    fine = coarse = 0.0
    samples = 0
    for batch in eval_batches(store_path, eval_rows, trainer.config.loader, max_batches=trainer.config.eval_batches):
        # In the training's micro-batches: a batch that ran out of memory in training may not fit here either.
        for features, latents in zip(batch["features"].tensor_split(trainer.micro_batches),
                                     batch["latents"].tensor_split(trainer.micro_batches)):
            if features.shape[0] == 0:
                continue
            with trainer.autocast, eager():
                _, metrics = model(features.to(device), latents.to(device))
            n = features.shape[0]
            fine += metrics["loss_fine"].item() * n
            coarse += metrics["loss_coarse"].item() * n
            samples += n
    model.train()
    if samples == 0:
        return {"loss_fine": float("nan"), "loss_coarse": float("nan"), "ratio": float("nan"),
                "improvement_pct": float("nan"), "eval_samples": 0}
    return {**ratio_metrics(fine / samples, coarse / samples), "eval_samples": samples}


# ---- metrics sink: log lines + wandb -------------------------------------------------------------------


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

    def log_pictures(self, paths: list[Path], step: int) -> None:
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
    import os

    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"
