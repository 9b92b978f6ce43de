"""A store and a run folder written by commit 967ec32 open and continue with this code.

The fixture (tests/data/compat-967ec32, made by its make.py at that commit; see its README.md) holds a store of
24 tiny videos (chunks 0-4 ok but for one failed row, chunk 5 pending) and a run folder after one training chunk
of 5 steps (checkpoint, history.jsonl, state.json, one attention picture, the lock file). Each test works on a
copy in tmp_path.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

from model.config import LLMShape, ModelConfig
from model.encoders import DEMO_DINO_ID, DEMO_VAE_ID, EncoderConfig
from storage.attrs import SamplingRecord, StoreExpectation
from storage.checkpoints import CheckpointStore
from storage.run_folder import RunFolder
from storage.store import OK, ChunkRows, FeatureStore
from tasks.convergence import ConvergenceConfig, decide, read_state, write_state
from tasks.decode import DecodeConfig
from tasks.listing import Listing
from tasks.precompute import PrecomputeConfig, check_can_continue
from tasks.training import read_history, train_chunk
from tests.tasks.test_training import tiny_config

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "compat-967ec32"
OLD_STEP = 5  # the old chunk's 5 steps
OLD_WINDOW = DecodeConfig(sampling="window", window_frames=72, frames=24)  # the frames the old store keeps


class OldRun(NamedTuple):
    store: Path
    run: Path


@pytest.fixture
def old(tmp_path) -> OldRun:
    for name in ("store.zarr", "run"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    return OldRun(tmp_path / "store.zarr", tmp_path / "run")


def micro_model() -> ModelConfig:
    """The fixture's model (make.py's micro_model): the tiny test model with a smaller LLM."""
    llm = LLMShape(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vocab_size=8,
                   rope_theta=10000.0, max_position_embeddings=64)
    return ModelConfig(llm=None, llm_shape=llm, feature_dim=8, num_tokens=5, query_dim=8, latent_size=4,
                       head_hidden=16, head_channels=(4, 8, 8))


# ---- the store -----------------------------------------------------------------------------------------


def test_the_old_store_opens_with_its_typed_attributes(old):
    store = FeatureStore.open(old.store)
    a = store.attributes
    assert a.schema_version == 2 and a.chunk_videos == 4 and a.compression == "none"
    assert (a.frames, a.tokens, a.feature_dim, list(a.latent_shape)) == (24, 5, 8, [4, 4, 4])
    assert (a.encoder_preset, a.dino.id, a.vae.id, a.frame_size) == ("demo", DEMO_DINO_ID, DEMO_VAE_ID, 256)
    assert (a.sampling.mode, a.sampling.window_frames, a.sampling.frames) == ("window", 72, 24)
    assert a.sampling.describe() == "24 of the first 72 frames"
    assert a.dino.model_extra["normalize"] == "imagenet"  # keys the typed record does not name are kept
    assert a.listing["kept"] == 24 and a.listing["dropped"]["too_short"] == 1
    assert store.counts() == {"videos": 24, "ok": 19, "failed": 1, "pending": 4}
    info = store.info()
    assert info["failed_by_reason"] == {"decode: no video stream": 1}
    assert info["sampling"]["mode"] == "window" and info["frame_interval"]["median_s"] == pytest.approx(0.125)
    assert info["listing"]["rows"] == 26


def test_the_old_store_matches_what_it_was_made_for_and_only_that(old):
    store = FeatureStore.open(old.store)
    expected = StoreExpectation(dino_id=DEMO_DINO_ID, vae_id=DEMO_VAE_ID, tokens=5, feature_dim=8,
                                latent_shape=[4, 4, 4], min_frames=24, sampling=OLD_WINDOW.sampling_record())
    assert store.check_compatible(expected) == []
    # control: the comparison reads the old attributes, it does not pass everything
    other = expected.model_copy(update={"tokens": 325, "sampling": SamplingRecord(mode="spread", frames=24)})
    assert {m.field for m in store.check_compatible(other)} == {"tokens", "sampling"}


def test_precompute_continues_the_old_store(old):
    store = FeatureStore.open(old.store, mode="r+")
    ids = [str(v) for v in store.read_column("video_id")]
    videos = pd.DataFrame({"video_id": ids, "source": [str(v) for v in store.read_column("source")],
                           "caption": [str(v) for v in store.read_column("caption")],
                           "duration_s": store.read_column("duration_s").astype(float)})
    config = PrecomputeConfig(encoder=EncoderConfig(preset="demo"), decode=OLD_WINDOW)
    check_can_continue(store, Listing(videos, store.attributes.listing), config)  # raises when it may not
    assert store.pending_chunks(config.retry_failed) == [4, 5]  # the failed row's chunk and the pending one
    rows = store.chunk_rows(5)
    n = len(rows)
    store.write_chunk(5, ChunkRows(np.ones((n, 24, 5, 8), np.float16), np.ones((n, 24, 4, 4, 4), np.float16),
                                   np.full(n, OK, np.uint8), [""] * n, frame_interval_s=np.full(n, 0.125, np.float32)))
    reopened = FeatureStore.open(old.store)
    assert reopened.counts() == {"videos": 24, "ok": 23, "failed": 1, "pending": 0}
    assert reopened.pending_chunks(retry_failed=False) == []


# ---- the run folder ------------------------------------------------------------------------------------


def test_training_continues_the_old_run_from_its_checkpoint(old):
    before = read_history(old.run)
    assert [(h["chunk"], h["step"]) for h in before] == [(1, OLD_STEP)]
    result = train_chunk(str(old.store), old.run, tiny_config(model=micro_model(), max_steps_per_chunk=5))
    assert result.resumed_from == str(old.run / "checkpoint-000000005.pt")
    assert (result.chunk, result.start_step, result.step) == (2, OLD_STEP, OLD_STEP + 5)
    assert result.wandb_run_id == before[0]["wandb_run_id"]  # the run keeps the id its old checkpoint holds
    assert math.isfinite(result.eval["ratio"])
    history = read_history(old.run)
    assert history[0] == before[0] and [(h["chunk"], h["step"]) for h in history] == [(1, 5), (2, 10)]
    assert CheckpointStore(old.run).latest() == old.run / "checkpoint-000000010.pt"
    decision = decide(history, ConvergenceConfig())
    assert (decision.chunks_done, decision.step, decision.done) == (2, 10, False)


def test_control_without_the_old_checkpoint_the_run_starts_over(old):
    """The assertions above tell a resumed run from a fresh one: here the old checkpoint is gone."""
    for path in old.run.glob("checkpoint-*"):
        path.unlink()
    result = train_chunk(str(old.store), old.run, tiny_config(model=micro_model(), max_steps_per_chunk=5))
    assert (result.chunk, result.start_step, result.step, result.resumed_from) == (2, 0, 5, None)


def test_the_convergence_decision_reads_the_old_state_and_history(old):
    state = read_state(old.run)
    assert (state["chunks_done"], state["step"], state["done"], state["converged"]) == (1, OLD_STEP, False, False)
    assert state["reason"] == "only 5 steps < min_steps 2000"
    history = read_history(old.run)
    decision = decide(history, ConvergenceConfig())
    assert (decision.chunks_done, decision.step, decision.reason) == (1, OLD_STEP, state["reason"])
    assert decision.ratio == history[0]["ratio"] == state["ratio"]
    assert decide(history, ConvergenceConfig(max_chunks=1)).done  # the budget counts the old chunk
    write_state(old.run, decision)
    assert read_state(old.run)["chunks_done"] == 1


def test_the_run_folder_finds_the_old_attention_picture_by_name(old):
    folder = RunFolder(old.run)
    assert [p.name for p in folder.pictures(1)] == ["chunk-001-vid009.png"]
    assert folder.read_history() == read_history(old.run) and folder.read_state() == read_state(old.run)
