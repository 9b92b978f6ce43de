"""One timed training chunk: resume from the latest checkpoint, train until the wall-clock budget, checkpoint,
evaluate on held-out rows, append to history.jsonl. And the chunk's attention pictures, drawn afterwards from its
checkpoint.

Plain functions; the Prefect tasks that wrap them live in tasks/chain.py. The training itself is the Trainer's
(tasks/trainer.py), the metrics' destinations are tasks/metrics.py's, the run folder's layout is storage's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from storage.attrs import StoreExpectation
from storage.checkpoints import CheckpointStore
from storage.loader import eval_batches, make_train_loader, split_rows
from storage.run_folder import RunFolder
from storage.store import FeatureStore
from tasks.attention import save_attention_pictures
from tasks.metrics import MetricsSink
from tasks.ranks import Ranks
from tasks.runtime import resolve_device
from tasks.train_config import TrainConfig, WandbConfig  # noqa: F401  (the chunk's configs, importable here)
from tasks.trainer import Budget, Trainer, TrainingDivergedError, build_model, lr_factor  # noqa: F401

log = logging.getLogger(__name__)


class StoreMismatchError(ValueError):
    """The store was not made for this training config; the message lists every difference."""


@dataclass
class ChunkData:
    """The store a chunk trains on: its training and held-out rows, and which frames its rows hold."""

    path: str
    train_rows: np.ndarray
    eval_rows: np.ndarray
    sampling: dict[str, Any]

    @classmethod
    def open(cls, store_path: str, config: TrainConfig) -> "ChunkData":
        store = FeatureStore.open(store_path)
        check_store(store, config)
        train_rows, eval_rows = split_rows(store.read_column("video_id"), store.read_status(),
                                           config.loader.eval_fraction)
        if len(train_rows) < config.loader.batch_size:
            raise StoreMismatchError(
                f"store {store_path} has {len(train_rows)} training rows, fewer than one batch of "
                f"{config.loader.batch_size}: precompute more videos or lower the batch size")
        return cls(store_path, train_rows, eval_rows, store_sampling(store))


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

    resumed_from: str | None = None
    micro_batch: int = 0  # samples per forward pass; below the batch size after an out-of-memory split

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def history_record(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """The chunk's line in history.jsonl: the held-out metrics at the top level, as the chain reads them."""
        return {"chunk": self.chunk, "step": self.step, **self.eval, "train": self.train,
                "samples_per_s": self.samples_per_s, "seconds": self.seconds, "stopped_by": self.stopped_by,
                "wandb_run_id": self.wandb_run_id, "micro_batch": self.micro_batch, "sampling": sampling,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def check_store(store: FeatureStore, config: TrainConfig) -> None:
    """Refuse a store whose attributes do not match the config, listing every difference."""
    m = config.model
    encoders = config.expected_encoders()
    expected = StoreExpectation(
        dino_id=encoders["dino"], vae_id=encoders["vae"], tokens=m.num_tokens, feature_dim=m.feature_dim,
        latent_shape=[m.latent_channels, m.latent_size, m.latent_size], min_frames=config.loader.frames,
    )
    diffs = [mismatch.describe("config wants") for mismatch in store.check_compatible(expected)]
    if diffs:
        raise StoreMismatchError(
            f"store {store.path} does not match the training config ({'; '.join(diffs)}); "
            f"use the store made with this preset (--preset) or set expect_dino/expect_vae"
        )


def store_sampling(store: FeatureStore) -> dict[str, Any]:
    """Which frames of each video the store's rows keep and how far apart they are: a ratio measured on frames
    0.1 s apart (the seed's window) and one on frames seconds apart are two experiments."""
    record = store.attributes.sampling
    median = store.frame_spacing()["median_s"]
    apart = f"{median:.3f} s apart (median)" if median is not None else "spacing unknown"
    return {**record.model_dump(mode="json"), "median_interval_s": median,
            "described": f"{record.describe()}, {apart}"}


class StopRequest:
    """A stop asked for from outside while a chunk trains (SIGTERM). Prefect's process worker cancels a flow run by
    sending its process group SIGTERM, then SIGKILL 30 s later: the loop ends at its next step boundary and the
    chunk is checkpointed and recorded in between. Call it to know whether a stop was asked for."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum  # no logging here: a handler may run inside a logging call of the main thread


@contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """While the block runs, SIGTERM asks the chunk to stop instead of ending the process; the previous handler
    (in a flow run, Prefect's: it raises TerminationSignal) is put back afterwards. Python runs signal handlers in
    the main thread and only the main thread may set them (Prefect runs a sync flow and its tasks there); in
    another thread the block runs under the process's handler as it is."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request.handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_sigterm(_worker: int) -> None:
    """A loader worker outlives the SIGTERM its process group gets when the flow run is cancelled, so the chunk can
    finish its step; the worker ends with the loader, or with its parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The chunk records of a run (RunFolder.read_history)."""
    return RunFolder(run_dir).read_history()


def train_chunk(store_path: str, run_dir: str | Path, config: TrainConfig, resume: str | None = None,
                metrics_sink: MetricsSink | None = None) -> ChunkResult:
    """Train one chunk under the run folder's lock and return what it did (the pictures: draw_chunk_pictures).

    SIGTERM while it runs (a cancelled flow run) ends the loop at the next step; the chunk is still checkpointed,
    evaluated and recorded, with stopped_by 'cancelled'. With config.nproc > 1 the chunk is a job of that many
    processes (tasks/distributed.py) and this process holds the lock around it (`metrics_sink`: one process only;
    the job's rank 0 makes its own)."""
    folder = RunFolder(run_dir)
    with folder.lock(), stop_on_sigterm() as stop:
        folder.chain_id()  # the chain's id is made with the folder (storage.run_folder)
        if config.nproc > 1:
            from tasks.distributed import launch_chunk  # torch.distributed's launcher only when asked for

            ChunkData.open(store_path, config)  # a store that does not fit fails here, before any process starts
            return launch_chunk(store_path, folder.path, config, resume)
        return train_in_folder(folder, store_path, config, resume, stop, Ranks(), metrics_sink)


def train_in_folder(folder: RunFolder, store_path: str, config: TrainConfig, resume: str | None,
                    stop: StopRequest, ranks: Ranks, metrics_sink: MetricsSink | None = None) -> ChunkResult:
    """The chunk itself, the folder already locked; with several ranks, rank 0 alone records it and logs."""
    data = ChunkData.open(store_path, config)
    checkpoints = folder.checkpoints(keep=config.keep_checkpoints)
    trainer, source = resume_trainer(checkpoints, config, resume, ranks)
    chunk = len(folder.read_history()) + 1
    log.info("store %s: %s", store_path, data.sampling["described"])
    sink = metrics_sink or (MetricsSink.for_run(folder.path, config, trainer.wandb_run_id,
                                                data={"store": store_path, "sampling": data.sampling})
                            if ranks.is_main else MetricsSink(None))
    result = _run_chunk(trainer, data, checkpoints, sink, chunk, stop)
    result.resumed_from = source
    if stop() or result.stopped_by == "cancelled":  # asked during the loop (any rank), or after it (evaluation)
        result.stopped_by = "cancelled"
        log.warning("chunk %d stopped by %s at step %d: checkpoint %s saved", chunk,
                    signal.Signals(stop.signal or signal.SIGTERM).name, result.step, result.checkpoint)
    if ranks.is_main:
        folder.append_history(result.history_record(data.sampling))
        sink.log({f"eval/{k}": v for k, v in result.eval.items()}, trainer.global_step)
    if metrics_sink is None:
        sink.close()
    return result


def resume_trainer(checkpoints: CheckpointStore, config: TrainConfig, resume: str | None,
                   ranks: Ranks | None = None) -> tuple[Trainer, str | None]:
    """A Trainer at the latest checkpoint (or at `resume`), or at step 0 seeded from the config. Every rank
    loads the same checkpoint: the same weights, optimizer, position and random state."""
    trainer = Trainer(config, ranks)
    # An explicit --resume must load as asked; the run folder's own latest falls back past a damaged one.
    loaded = (checkpoints.load(resume, map_location="cpu"), Path(resume)) if resume else checkpoints.load_latest()
    if loaded is None:
        trainer.seed()
        return trainer, None
    trainer.load_state(loaded[0])
    log.info("resumed from %s at step %d", loaded[1], trainer.global_step)
    return trainer, str(loaded[1])


def _run_chunk(trainer: Trainer, data: ChunkData, checkpoints: CheckpointStore, sink: MetricsSink,
               chunk: int, stop: StopRequest | None = None) -> ChunkResult:
    """Train to the budget (or a stop request), checkpoint the last step, evaluate on the held-out rows."""
    config = trainer.config
    start_step = trainer.global_step
    budget = Budget.for_chunk(config, start_step, stop)
    ranks = trainer.ranks
    loader = make_train_loader(data.path, data.train_rows, config.loader, trainer.position,
                               pin_memory=trainer.device.type == "cuda", part=(ranks.rank, ranks.world))
    if loader.num_workers > 0 and loader.worker_init_fn is None:
        loader.worker_init_fn = ignore_sigterm
    stopped_by = trainer.fit(loader, checkpoints, sink, budget)
    seconds = budget.elapsed()
    # Saved once per step: the loop may just have saved this one, or a resumed finished run has it already.
    saved = trainer.global_step in checkpoints.steps()
    checkpoint = checkpoints.path_for(trainer.global_step) if saved else trainer.save(checkpoints)
    # The first eval_batches batches' rows, whatever the number of ranks; each rank evaluates its share of them.
    held_out = np.unique(data.eval_rows)[: config.eval_batches * config.loader.batch_size]
    evaluation = trainer.evaluate(eval_batches(data.path, ranks.share(held_out), config.loader,
                                               max_batches=config.eval_batches))
    samples = (trainer.global_step - start_step) * config.loader.batch_size
    return ChunkResult(
        chunk=chunk, start_step=start_step, step=trainer.global_step, seconds=round(seconds, 3),
        samples_per_s=samples / seconds if seconds > 0 else 0.0, train=sink.last_train, eval=evaluation,
        checkpoint=str(checkpoint), wandb_run_id=trainer.wandb_run_id, stopped_by=stopped_by,
        micro_batch=trainer.micro_batch(config.loader.batch_size // ranks.world),
    )


def draw_chunk_pictures(store_path: str, run_dir: str | Path, config: TrainConfig,
                        log_to_wandb: bool = True) -> list[Path]:
    """The attention of the first held-out videos under the run's latest checkpoint, saved as the latest
    chunk's pictures in the run folder (and logged to the run's wandb run). No checkpoint or no held-out
    video: no pictures."""
    folder = RunFolder(run_dir)
    with folder.lock():
        history = folder.read_history()
        loaded = folder.checkpoints(keep=config.keep_checkpoints).load_latest()
        if not history or loaded is None or config.attention_videos == 0:
            return []
        paths = _draw_pictures(store_path, folder, config, loaded[0], folder.picture_prefix(history[-1]["chunk"]))
    run_id = loaded[0].get("wandb_run_id")
    if log_to_wandb and paths and run_id:
        sink = MetricsSink.for_run(folder.path, config, run_id,
                                   data={"store": store_path, "sampling": history[-1].get("sampling")})
        sink.log_pictures(paths, None)
        sink.close()
    return paths


def _draw_pictures(store_path: str, folder: RunFolder, config: TrainConfig, state: dict[str, Any],
                   prefix: str) -> list[Path]:
    store = FeatureStore.open(store_path)
    _, eval_rows = split_rows(store.read_column("video_id"), store.read_status(), config.loader.eval_fraction)
    device = torch.device(resolve_device(config.device))
    model = build_model(config.model, config.seed)
    model.load_state_dict(state["model"])
    return save_attention_pictures(
        model.to(device), store_path, [int(r) for r in eval_rows[:config.attention_videos]], config.loader.frames,
        folder.attention_folder(), prefix, device,
    )
