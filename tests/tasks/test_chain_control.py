"""Stopping a chunk from outside (SIGTERM, as Prefect's process worker cancels a run), the chain's id, and the
training config the train deployment's run form builds from a preset, a few knobs and advanced overrides."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from storage.checkpoints import CheckpointStore
from storage.run_folder import RunFolder
from tasks.chain_control import TrainOverrideError, chunk_key, train_config
from tasks.metrics import MetricsSink
from tasks.train_config import TrainConfig
from tasks.training import read_history, train_chunk
from tests.tasks.test_training import make_tiny_store, tiny_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.zarr")


class SigtermAt(MetricsSink):
    """A sink that sends this process SIGTERM when the loop logs step `step` (mid-chunk, in the main thread)."""

    def __init__(self, step: int):
        super().__init__(None)
        self.step = step

    def log_train(self, metrics, lr, step):
        super().log_train(metrics, lr, step)
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_the_chunk_at_the_next_step_with_a_checkpoint_and_a_record(store, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    result = train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=50, checkpoint_every=100),
                         metrics_sink=SigtermAt(step=4))
    assert result.stopped_by == "cancelled" and result.step == 4  # not the chunk's 50 steps, not killed
    assert CheckpointStore(tmp_path).steps() == [4] and result.checkpoint == str(CheckpointStore(tmp_path).path_for(4))
    (record,) = read_history(tmp_path)
    assert record["stopped_by"] == "cancelled" and record["step"] == 4 and record["ratio"] > 0
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back

    # the next chunk continues from that checkpoint
    again = train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=3))
    assert again.start_step == 4 and again.step == 7 and again.stopped_by == "steps"
    assert again.resumed_from == result.checkpoint


def test_the_chain_id_is_made_once_and_a_new_folder_on_the_same_path_gets_a_new_one(tmp_path):
    run = tmp_path / "nightly"
    first = chunk_key(str(run), 2)
    assert (run / "chain.json").exists() and chunk_key(str(run), 2) == first
    assert first.startswith("nightly-") and first.endswith("-chunk-2") and chunk_key(str(run), 3) != first
    assert RunFolder(run).chain_id() == RunFolder(run).chain_id() and RunFolder(run).chain_id() in first
    shutil.rmtree(run)
    assert chunk_key(str(run), 2) != first  # the user started over: chunk 2 of the new chain is a new run


def test_a_chunk_gives_a_folder_made_without_a_chain_id_one(store, tmp_path):
    train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=1))
    chain = RunFolder(tmp_path).chain_id()
    (tmp_path / "chain.json").unlink()  # a folder made by an older version
    train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=1))
    assert (tmp_path / "chain.json").exists() and RunFolder(tmp_path).chain_id() != chain


def test_overrides_merge_over_the_preset_and_the_knobs_win():
    config = train_config("demo", {"warmup_steps": 7, "loader": {"num_workers": 1}}, batch_size=4, lr=0.5,
                          max_minutes=3)
    demo = TrainConfig.for_preset("demo")
    assert config.warmup_steps == 7 and config.loader.num_workers == 1 and config.loader.batch_size == 4
    assert config.lr == 0.5 and config.max_minutes == 3
    assert config.model == demo.model and config.total_steps == demo.total_steps and config.preset == "demo"
    assert train_config("full") == TrainConfig.for_preset("full")
    assert train_config("demo", {"lr": 0.2}, lr=0.3).lr == 0.3


@pytest.mark.parametrize("overrides, says", [
    ({"preset": "full"}, "set preset to 'full'"),
    ({"lodaer": {"batch_size": 2}}, "lodaer"),
    ({"loader": {"batchsize": 2}}, "loader.batchsize"),
])
def test_overrides_that_contradict_the_preset_or_name_nothing_are_refused(overrides, says):
    with pytest.raises(TrainOverrideError, match=says):
        train_config("demo", overrides)
