"""One training chunk on a tiny store: resume equality, checkpoints, history, the lock, store checks."""

import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import torch

from model.config import LLMShape, ModelConfig
from model.encoders import DEMO_DINO_ID, DEMO_VAE_ID
from storage.checkpoints import CheckpointStore
from storage.loader import LoaderConfig
from storage.runlock import RunLock, RunLockedError
from storage.store import OK, ChunkRows, FeatureShapes, FeatureStore, StoreConfig
from tasks.decode import DecodeConfig
from tasks.training import (
    StoreMismatchError,
    TrainConfig,
    WandbConfig,
    lr_factor,
    read_history,
    draw_chunk_pictures,
    train_chunk,
)

SHAPES = FeatureShapes(frames=24, tokens=5, feature_dim=8, latent_shape=(4, 4, 4))


def make_tiny_store(path, videos=40, k=4, dino=DEMO_DINO_ID, seed=0):
    """A store with tiny token/latent shapes and demo encoder ids; latents drift smoothly over time."""
    ids = [f"vid{i:03d}" for i in range(videos)]
    store = FeatureStore.create(
        path, ids, [f"caption {i}" for i in ids], [f"missing/{i}.mp4" for i in ids], [30.0] * videos,
        {"dino": {"id": dino}, "vae": {"id": DEMO_VAE_ID}, "frame_size": 256, "listing": {},
         "sampling": DecodeConfig().sampling_record()},
        StoreConfig(chunk_videos=k), SHAPES,
    )
    rng = np.random.default_rng(seed)
    for chunk in range(store.num_chunks):
        n = len(store.chunk_rows(chunk))
        base = rng.standard_normal((n, 1, 4, 4, 4))
        drift = rng.standard_normal((n, 1, 4, 4, 4)) * 0.1
        latents = base + drift * np.arange(24)[None, :, None, None, None]
        store.write_chunk(chunk, ChunkRows(
            features=rng.standard_normal((n, 24, 5, 8)).astype(np.float16),
            latents=latents.astype(np.float16), status=np.full(n, OK, np.uint8), error=[""] * n,
            frame_interval_s=np.full(n, 0.125, np.float32),
        ))
    return str(path)


def tiny_config(**overrides) -> TrainConfig:
    model = ModelConfig(llm=None, llm_shape=LLMShape.tiny(), feature_dim=8, num_tokens=5, query_dim=8,
                        latent_size=4, head_hidden=16, head_channels=(4, 8, 8))
    base = dict(preset="demo", model=model, loader=LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=0),
                lr=1e-3, warmup_steps=3, total_steps=100, log_every=2, checkpoint_every=4, max_minutes=10,
                eval_batches=2, attention_videos=1, device="cpu", wandb=WandbConfig(mode="disabled"))
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.zarr")


def weights(run_dir):
    return CheckpointStore(run_dir).load()["model"]


def test_two_chunks_end_with_the_weights_of_one_long_chunk(store, tmp_path):
    for _ in range(2):
        train_chunk(store, tmp_path / "two", tiny_config(max_steps_per_chunk=5))
    train_chunk(store, tmp_path / "one", tiny_config(max_steps_per_chunk=10))
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for name in one:
        assert torch.equal(two[name], one[name]), name
    assert CheckpointStore(tmp_path / "two").load()["step"] == 10


def test_resume_equality_holds_with_loader_workers(store, tmp_path):
    config = dict(loader=LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=2))
    for _ in range(2):
        train_chunk(store, tmp_path / "two", tiny_config(max_steps_per_chunk=3, **config))
    train_chunk(store, tmp_path / "one", tiny_config(max_steps_per_chunk=6))  # no workers: same batches
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert all(torch.equal(two[k], one[k]) for k in one)


def test_history_records_each_chunk_with_the_users_metrics(store, tmp_path):
    first = train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=4))
    second = train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=4))
    history = read_history(tmp_path)
    assert [h["chunk"] for h in history] == [1, 2] and [h["step"] for h in history] == [4, 8]
    assert (first.chunk, second.chunk, second.start_step) == (1, 2, 4)
    for record in history:
        assert record["ratio"] == pytest.approx(record["loss_coarse"] / record["loss_fine"])
        assert record["improvement_pct"] == pytest.approx((record["ratio"] - 1) * 100)
        assert record["eval_samples"] > 0 and record["stopped_by"] == "steps"
    train = history[-1]["train"]
    assert {"loss_fine", "loss_coarse", "ratio", "improvement_pct", "lr", "samples_per_s"} <= set(train)
    sampling = history[-1]["sampling"]  # which experiment the ratio measures: the store's frame window
    assert (sampling["mode"], sampling["window_frames"], sampling["median_interval_s"]) == ("window", 72, 0.125)
    assert sampling["described"] == "24 of the first 72 frames, 0.125 s apart (median)"
    pictures = draw_chunk_pictures(store, tmp_path, tiny_config())  # the chain's next task, from the checkpoint
    assert pictures and all(os.path.exists(p) and p.name.startswith("chunk-002-") for p in pictures)


def test_checkpoint_holds_everything_a_resume_needs(store, tmp_path):
    train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=4, keep_checkpoints=2))
    checkpoints = CheckpointStore(tmp_path)
    assert checkpoints.steps() == [4]  # periodic save at 4 is the end-of-chunk save too
    state = torch.load(checkpoints.latest(), weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "step", "loader", "rng", "config", "wandb_run_id"} <= set(state)
    assert state["loader"] == {"epoch": 0, "batch": 4}
    assert state["config"]["lr"] == 1e-3 and state["wandb_run_id"]


def test_explicit_resume_starts_from_that_checkpoint(store, tmp_path):
    train_chunk(store, tmp_path / "a", tiny_config(max_steps_per_chunk=4, checkpoint_every=2))
    early = CheckpointStore(tmp_path / "a").path_for(2)
    result = train_chunk(store, tmp_path / "b", tiny_config(max_steps_per_chunk=2), resume=str(early))
    assert (result.start_step, result.step) == (2, 4)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_wall_clock_budget_ends_a_chunk(store, tmp_path):
    result = train_chunk(store, tmp_path, tiny_config(max_minutes=0.02))
    assert result.stopped_by == "time" and result.step >= 1
    assert 1.0 <= result.seconds < 30


def test_the_schedule_continues_across_chunks():
    config = tiny_config(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.55)
    assert lr_factor(110, config) == pytest.approx(0.1) and lr_factor(500, config) == pytest.approx(0.1)


def test_a_store_for_other_encoders_or_shapes_is_refused(tmp_path):
    other = make_tiny_store(tmp_path / "other.zarr", videos=8, dino="facebook/dinov2-small")
    with pytest.raises(StoreMismatchError) as err:
        train_chunk(other, tmp_path / "run", tiny_config(model=ModelConfig.for_preset("demo")))
    message = str(err.value)
    assert "dino: store has 'facebook/dinov2-small', config wants 'demo:sincos-dinov2'" in message
    assert "tokens: store has 5, config wants 325" in message and "feature_dim" in message
    assert not (tmp_path / "run" / "history.jsonl").exists()


def _hold(run_dir, ready):
    with RunLock(run_dir):
        ready.set()
        signal.pause()


def test_a_second_trainer_on_the_same_folder_stops(store, tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError, match="in use by another trainer"):
            train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=2))
    finally:
        holder.kill()
        holder.join()
    assert train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=2)).step == 2


@pytest.mark.slow
def test_wandb_offline_run_is_continued_across_chunks(store, tmp_path):
    config = tiny_config(max_steps_per_chunk=4, wandb=WandbConfig(mode="offline"))
    first = train_chunk(store, tmp_path, config)
    second = train_chunk(store, tmp_path, config)
    assert first.wandb_run_id == second.wandb_run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with a "-1" suffix when both chunks started within the same second
    assert len(runs) == 2 and all(f"-{first.wandb_run_id}" in r.name for r in runs)
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run's config travels in its record file
    assert b'"median_interval_s":0.125' in record and b'"window_frames":72' in record
    assert json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])["step"] == 8
