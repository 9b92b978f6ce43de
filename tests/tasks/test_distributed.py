"""A chunk as a job of several processes (DDP over gloo on the CPU): the same weights as one process, a killed rank
that ends the job in bounded time and a resume with one process, and batch sizes that do not divide."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from storage.checkpoints import CheckpointStore
from storage.loader import LoaderConfig, LoaderError, LoaderPosition, TrainBatches, epoch_order
from storage.store import FeatureStore
from tasks.chain_control import train_config
from tasks.ranks import Ranks
from tasks.training import read_history, train_chunk
from tests.tasks.test_training import make_tiny_store, tiny_config

REPO = Path(__file__).resolve().parents[2]
LOADER = LoaderConfig(batch_size=8, buffer_chunks=2, num_workers=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.zarr")


def latest(run_dir) -> dict:
    state, _ = CheckpointStore(run_dir).load_latest()
    return state


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), name


# ---- refused settings ---------------------------------------------------------------------------------------


def test_a_batch_size_not_divisible_by_nproc_is_refused_with_what_to_change():
    with pytest.raises(ValidationError, match="loader.batch_size 6 is not divisible by nproc 4: .* set "
                                              "--batch-size to a multiple of 4 or --nproc to a divisor of 6"):
        tiny_config(nproc=4, loader=LOADER.model_copy(update={"batch_size": 6}))
    with pytest.raises(ValidationError, match="not divisible by nproc 3"):
        train_config("demo", batch_size=8, nproc=3)  # the flow's knobs go through the same check
    assert train_config("demo", batch_size=8, nproc=2).nproc == 2


def test_the_loader_refuses_parts_that_do_not_cut_a_batch_evenly(store):
    with pytest.raises(LoaderError, match="cannot cut batches of 8 into 3 equal parts"):
        TrainBatches(store, np.arange(36), LOADER, LoaderPosition(), chunk_videos=4, part=(0, 3))


# ---- slices of the global order -------------------------------------------------------------------------------


def take(dataset: TrainBatches, n: int) -> list[dict]:
    out = []
    for batch in dataset:
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        if len(out) == n:
            return out
    return out


def test_the_parts_of_each_batch_are_its_contiguous_slices_in_the_global_order(store):
    rows = np.arange(FeatureStore.open(store).num_videos)[2:]  # any training rows
    position = LoaderPosition(epoch=1, batch=3)  # across an epoch boundary
    whole = take(TrainBatches(store, rows, LOADER, position, 4), 3)
    parts = [take(TrainBatches(store, rows, LOADER, position, 4, part=(p, 2)), 3) for p in range(2)]
    for i, batch in enumerate(whole):
        assert [(part[i]["epoch"], part[i]["batch"]) for part in parts] == [(batch["epoch"], batch["batch"])] * 2
        assert torch.equal(torch.cat([part[i]["rows"] for part in parts]), batch["rows"])
        assert torch.equal(torch.cat([part[i]["features"] for part in parts]), batch["features"])
    order = epoch_order(np.unique(rows), 4, LOADER, 1)
    assert torch.equal(parts[1][0]["rows"], torch.from_numpy(order[3, 4:]))


def test_held_out_rows_are_shared_without_overlap():
    rows = np.arange(10)
    shares = [Ranks(rank=r, world=3).share(rows) for r in range(3)]
    assert np.array_equal(np.concatenate(shares), rows) and [len(s) for s in shares] == [4, 3, 3]


# ---- the job ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one_at_the_same_global_batch(store, tmp_path):
    config = tiny_config(loader=LOADER, max_steps_per_chunk=6, eval_batches=4)
    one = train_chunk(store, tmp_path / "one", config)
    two = train_chunk(store, tmp_path / "two", config.model_copy(update={"nproc": 2}))
    assert (two.start_step, two.step, two.stopped_by) == (0, 6, "steps")
    assert_close_weights(latest(tmp_path / "two")["model"], latest(tmp_path / "one")["model"])
    assert latest(tmp_path / "two")["loader"] == latest(tmp_path / "one")["loader"] == {"epoch": 1, "batch": 2}
    # Evaluation: the ranks' sums add up to one process's over the same rows.
    assert two.eval["eval_samples"] == one.eval["eval_samples"]
    assert two.eval["loss_fine"] == pytest.approx(one.eval["loss_fine"], abs=1e-5)
    assert two.train["loss_fine"] == pytest.approx(one.train["loss_fine"], abs=1e-5)  # the ranks' mean
    # Rank 0 alone wrote: one history record, the same checkpoint files.
    assert [h["step"] for h in read_history(tmp_path / "two")] == [6]
    assert CheckpointStore(tmp_path / "two").steps() == CheckpointStore(tmp_path / "one").steps()


DRIVER = """
import sys
import torch
torch.set_num_threads(1)
from tasks.training import TrainConfig, train_chunk
train_chunk(sys.argv[1], sys.argv[2], TrainConfig.model_validate_json(open(sys.argv[3]).read()))
"""


def worker_pids(parent: int, world: int, timeout: float = 60.0) -> list[int]:
    """The pids of the job's workers, by local rank: the launching process's spawned children (the agent starts
    them one after the other in rank order; their RANK is set inside them, not in /proc/<pid>/environ)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = []
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                workers.append(int(child))
        if len(workers) == world:
            return sorted(workers)
        time.sleep(0.1)
    raise AssertionError(f"no {world} workers under {parent}")


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_every_rank_at_one_step_and_records_a_cancelled_chunk(store, tmp_path):
    """What a cancel in the UI does (the process worker's SIGTERM to the run's process group)."""
    config = tiny_config(loader=LOADER, total_steps=400, checkpoint_every=4, log_every=4, nproc=2)
    run, config_file = tmp_path / "run", tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "FVLM_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, store, str(run), str(config_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        checkpoints = CheckpointStore(run)
        while proc.poll() is None and max(checkpoints.steps(), default=0) < 4:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err.decode()[-3000:]
    [record] = read_history(run)
    assert record["stopped_by"] == "cancelled" and 4 <= record["step"] < 400
    assert latest(run)["step"] == record["step"]  # checkpointed where the ranks stopped


# ---- out of memory on one rank --------------------------------------------------------------------------------

OOM_ENV = "FVLM_TEST_RANK1_MAX_SAMPLES"


def worker_with_a_small_rank_1(store_path: str, run_dir: str, config_json: dict, resume: str | None):
    """chunk_worker, but rank 1's forward passes over more than $FVLM_TEST_RANK1_MAX_SAMPLES samples raise the
    CUDA out-of-memory error (simulated: a CPU has no CUDA memory), as a GPU with less free memory would."""
    from model.foveated import EfficientFoveatedModel
    from tasks.distributed import chunk_worker

    limit, forward = int(os.environ[OOM_ENV]), EfficientFoveatedModel.forward

    def limited(self, dino_features, latents):
        if os.environ["RANK"] == "1" and dino_features.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(self, dino_features, latents)

    EfficientFoveatedModel.forward = limited
    return chunk_worker(store_path, run_dir, config_json, resume)


@pytest.mark.slow
def test_out_of_memory_on_one_rank_splits_the_batch_on_every_rank(store, tmp_path, monkeypatch):
    from storage.run_folder import RunFolder
    from tasks.distributed import launch_chunk

    config = tiny_config(loader=LOADER, max_steps_per_chunk=4)
    train_chunk(store, tmp_path / "reference", config)
    monkeypatch.setenv(OOM_ENV, "2")  # rank 1's slice of 4 does not fit, 2 do
    RunFolder(tmp_path / "run").chain_id()
    result = launch_chunk(store, tmp_path / "run", config.model_copy(update={"nproc": 2}), None,
                          worker=worker_with_a_small_rank_1)
    assert result.step == 4 and result.micro_batch == 2  # both ranks run 2 micro-batches of 2
    assert latest(tmp_path / "run")["micro_batches"] == 2
    assert_close_weights(latest(tmp_path / "run")["model"], latest(tmp_path / "reference")["model"])
