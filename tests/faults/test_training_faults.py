"""Training under faults: SIGKILL at random moments, damaged checkpoints, out of memory inside a chunk.

The kills are real (a training process in its own process group, killed with SIGKILL); the out-of-memory error
is simulated, as a CPU cannot run out of CUDA memory: the model's forward raises torch.OutOfMemoryError for
batches above a size, which is what a GPU does when a batch's activations do not fit.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.foveated import EfficientFoveatedModel
from storage.checkpoints import CheckpointError, CheckpointStore
from tasks.training import TrainConfig, read_history, train_chunk
from tests.tasks.test_training import make_tiny_store, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.zarr")


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    state, _ = CheckpointStore(run_dir).load_latest()
    return state["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- damaged checkpoints ----------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":  # loads without complaint in torch.load: only the digest notices
        for offset in range(len(data) // 3, len(data) // 3 + 64):
            data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty"])
def test_damaged_latest_checkpoint_is_skipped_with_a_warning(store, tmp_path, caplog, how):
    reference = tmp_path / "reference"
    train_chunk(store, reference, tiny_config(max_steps_per_chunk=12))

    run = tmp_path / "run"
    train_chunk(store, run, tiny_config(max_steps_per_chunk=8))  # checkpoints at steps 4 and 8
    damage(CheckpointStore(run).path_for(8), how)
    with caplog.at_level(logging.WARNING, logger="storage.checkpoints"):
        result = train_chunk(store, run, tiny_config(max_steps_per_chunk=8))
    assert "checkpoint-000000008.pt" in caplog.text and "checkpoint before it" in caplog.text
    assert result.resumed_from.endswith("checkpoint-000000004.pt")
    assert result.start_step == 4 and result.step == 12
    assert (run / "checkpoint-000000008.pt.corrupt").exists()  # kept for a look, never picked again
    # It went on from step 4 exactly as a run that was never damaged.
    assert_same_weights(final_weights(run), final_weights(reference))


def test_every_checkpoint_damaged_stops_instead_of_starting_over(store, tmp_path):
    train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=8))
    checkpoints = CheckpointStore(tmp_path)
    for step in checkpoints.steps():
        damage(checkpoints.path_for(step), "flipped")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=8))
    assert [h["step"] for h in read_history(tmp_path)] == [8]


def test_an_explicit_resume_of_a_damaged_checkpoint_is_refused(store, tmp_path):
    train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=8))
    path = CheckpointStore(tmp_path).path_for(8)
    damage(path, "flipped")
    with pytest.raises(CheckpointError, match="is corrupt"):
        train_chunk(store, tmp_path / "other", tiny_config(max_steps_per_chunk=8), resume=str(path))


def test_a_history_line_torn_by_a_kill_is_skipped_and_the_next_record_lands_whole(store, tmp_path, caplog):
    train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=4))
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"chunk": 2, "step"')  # the process died in the middle of an append
    with caplog.at_level(logging.WARNING, logger="tasks.training"):
        result = train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=4))
    assert "not a complete record" in caplog.text
    assert result.chunk == 2 and [h["step"] for h in read_history(tmp_path)] == [4, 8]


# ---- write failures ---------------------------------------------------------------------------------------

FULL_DISK_DRIVER = """
import resource, signal, sys
import torch
from tasks.training import TrainConfig, train_chunk
config = TrainConfig.model_validate_json(open(sys.argv[3]).read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
train_chunk(sys.argv[1], sys.argv[2], config)
"""


def test_a_full_disk_at_a_checkpoint_is_a_clear_error_and_the_older_checkpoints_stay(store, tmp_path):
    """A real write failure: the process's file-size limit makes the checkpoint write fail like a full disk."""
    config = tiny_config(max_steps_per_chunk=4)
    train_chunk(store, tmp_path, config)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    config_file = tmp_path.parent / f"{tmp_path.name}-config.json"
    config_file.write_text(config.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "FVLM_PROGRESS": "0"}
    run = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER, store, str(tmp_path), str(config_file)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode != 0
    assert "could not write checkpoint checkpoint-000000008.pt" in run.stderr and "File too large" in run.stderr
    assert "free disk space" in run.stderr and "resumes from checkpoint-000000004.pt" in run.stderr
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after.keys() - {".lock"} == before.keys() - {".lock"}  # no temporary file, no new checkpoint
    assert all(after[name] == data for name, data in before.items() if name != ".lock")
    assert train_chunk(store, tmp_path, config).start_step == 4  # with room again it goes on from there


# ---- divergence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_every, caught_by", [(2, r"the mean loss of steps .* is nan \(fine\), nan \(coarse\)"),
                                                  (1000, "some weights are NaN or inf")])
def test_a_row_of_infinities_stops_the_chunk_before_it_saves_nan_weights(tmp_path, log_every, caught_by):
    """A store row with inf features (what an fp16 encoder overflow writes) makes the loss NaN: the chunk stops
    at the next log line, or at the next checkpoint when that comes first, with an error that names the step
    and the last good checkpoint, and saves nothing."""
    import numpy as np

    from storage.store import FeatureStore
    from tasks.training import TrainingDivergedError

    path = make_tiny_store(tmp_path / "s.zarr", videos=40)
    train_chunk(path, tmp_path / "run", tiny_config(max_steps_per_chunk=4))  # a good checkpoint at step 4
    store = FeatureStore.open(path, mode="r+")
    rows = store.read_chunk(0)
    rows.features[:] = np.inf  # every row of the first chunk: some batch of the next steps draws one
    store.write_chunk(0, rows)
    with pytest.raises(TrainingDivergedError, match=rf"diverged at step \d+: {caught_by}; nothing was saved after "
                                                    r"checkpoint-000000004.pt"):
        train_chunk(path, tmp_path / "run", tiny_config(max_steps_per_chunk=40, log_every=log_every))
    checkpoints = CheckpointStore(tmp_path / "run")
    for step in checkpoints.steps():
        state = checkpoints.load(checkpoints.path_for(step))
        assert all(torch.isfinite(v).all() for v in state["model"].values()), step
    assert [h["step"] for h in read_history(tmp_path / "run")] == [4]


# ---- stores made for something else ---------------------------------------------------------------------


def test_a_store_of_another_schema_or_dtype_is_refused_with_the_difference(tmp_path):
    import zarr

    from storage.store import StoreError
    from tasks.training import StoreMismatchError

    newer = make_tiny_store(tmp_path / "newer.zarr", videos=8)
    zarr.open_group(newer, mode="r+").attrs["schema_version"] = 3
    with pytest.raises(StoreError, match="has store schema 3; this code reads schema 2"):
        train_chunk(newer, tmp_path / "run", tiny_config(max_steps_per_chunk=2))

    wider = make_tiny_store(tmp_path / "wider.zarr", videos=8)
    group = zarr.open_group(wider, mode="r+")
    values = group["dino_features"][:]
    del group["dino_features"]
    group.create_array("dino_features", data=values.astype("float32"), chunks=(4, *values.shape[1:]))
    with pytest.raises(StoreMismatchError, match="dino_features dtype: store has float32, this code reads float16"):
        train_chunk(wider, tmp_path / "run", tiny_config(max_steps_per_chunk=2))
    assert not (tmp_path / "run" / "history.jsonl").exists()


# ---- out of memory ----------------------------------------------------------------------------------------


@pytest.fixture
def memory_limit(monkeypatch):
    """Simulated CUDA OOM: forward passes (training or evaluation) over more than `limit["samples"]` samples
    raise, as a full GPU does."""
    limit = {"samples": None, "raised": 0}
    forward = EfficientFoveatedModel.forward

    def limited(self, dino_features, latents):
        if limit["samples"] is not None and dino_features.shape[0] > limit["samples"]:
            limit["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(self, dino_features, latents)

    monkeypatch.setattr(EfficientFoveatedModel, "forward", limited)
    return limit


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(store, tmp_path, caplog, memory_limit):
    config = tiny_config(max_steps_per_chunk=8)  # batch 4
    train_chunk(store, tmp_path / "reference", config)

    memory_limit["samples"] = 1
    with caplog.at_level(logging.WARNING, logger="tasks.training"):
        result = train_chunk(store, tmp_path / "run", config)
    assert memory_limit["raised"] == 2  # 4 -> 2 -> 1, then every step fits
    assert "out of memory at step 0 with micro-batch 4: now 2 micro-batches of 2" in caplog.text
    assert "now 4 micro-batches of 1" in caplog.text and "effective batch 4 unchanged" in caplog.text
    assert result.step == 8 and result.micro_batch == 1
    assert read_history(tmp_path / "run")[-1]["micro_batch"] == 1
    # Gradient accumulation over four parts gives the weights of whole batches, up to float rounding.
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "reference"), exact=False)
    # A true batch of 1 would not: the equality above is not a tolerance that hides everything.
    train_chunk(store, tmp_path / "batch1", tiny_config(max_steps_per_chunk=8,
                                                         loader=config.loader.model_copy(update={"batch_size": 1})))
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights(tmp_path / "batch1"), final_weights(tmp_path / "reference"), exact=False)

    # The split is in the checkpoint: the next chunk starts with it instead of running out of memory again.
    raised = memory_limit["raised"]
    assert CheckpointStore(tmp_path / "run").load()["micro_batches"] == 4
    assert train_chunk(store, tmp_path / "run", config).micro_batch == 1
    assert memory_limit["raised"] == raised


def test_out_of_memory_at_one_sample_is_a_clear_error(store, tmp_path, memory_limit):
    memory_limit["samples"] = 0
    with pytest.raises(torch.OutOfMemoryError, match="even with a micro-batch of one sample"):
        train_chunk(store, tmp_path, tiny_config(max_steps_per_chunk=4))
    assert read_history(tmp_path) == []


# ---- SIGKILL ----------------------------------------------------------------------------------------------

KILLS = 10
TOTAL_STEPS = 300
DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
from tasks.training import TrainConfig, train_chunk
train_chunk(sys.argv[1], sys.argv[2], TrainConfig.model_validate_json(open(sys.argv[3]).read()))
"""


def start_training(store: str, run_dir: Path, config_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FVLM_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, store, str(run_dir), str(config_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def run_to_end(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def watch_reference(proc: subprocess.Popen, run_dir: Path) -> dict[str, float]:
    """Times of the reference run: start-up (until training starts), seconds per step, the tail after the last
    step (evaluation, pictures), read from when its checkpoints appear."""
    started = time.monotonic()
    checkpoints, seen = CheckpointStore(run_dir), {}
    while proc.poll() is None:
        for step in checkpoints.steps():
            seen.setdefault(step, time.monotonic() - started)
        time.sleep(0.02)
    lifetime = time.monotonic() - started
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    first, last = min(seen), max(seen)
    per_step = (seen[last] - seen[first]) / (last - first)
    return {"startup": seen[first] - first * per_step, "per_step": per_step, "tail": lifetime - seen[last]}


def wait_for_checkpoint(proc: subprocess.Popen, checkpoints: CheckpointStore, after: int) -> None:
    while proc.poll() is None and max(checkpoints.steps(), default=0) <= after:
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_ten_random_moments_resumes_to_the_uninterrupted_weights(store, tmp_path):
    config = tiny_config(total_steps=TOTAL_STEPS, checkpoint_every=10, log_every=10, keep_checkpoints=3)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    times = watch_reference(start_training(store, tmp_path / "reference", config_file), tmp_path / "reference")

    rng = random.Random(20261125)
    plan = ["start-up"] * 2 + ["training"] * (KILLS - 3)
    rng.shuffle(plan)
    plan.append("evaluation and pictures")  # the last one, once the steps are nearly all done
    run = tmp_path / "run"
    checkpoints = CheckpointStore(run)
    latest_steps, phases = [0], []
    for kill, phase in enumerate(plan):
        # Training kills are timed from the process's first new checkpoint (its start-up varies with the load),
        # and land on average after 1/(kills left) of the steps still to do, so they spread over the whole run.
        steps_left = TOTAL_STEPS - latest_steps[-1]
        proc = start_training(store, run, config_file)
        if phase == "start-up":
            time.sleep(rng.uniform(0.0, times["startup"]))
        elif phase == "training":
            wait_for_checkpoint(proc, checkpoints, after=latest_steps[-1])
            time.sleep(rng.uniform(0.0, 2 * steps_left * times["per_step"] / max(1, plan[kill:].count("training"))))
        else:
            wait_for_checkpoint(proc, checkpoints, after=TOTAL_STEPS - 1)
            time.sleep(rng.uniform(0.0, times["tail"]))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            phase = "after the end"
        phases.append(phase)
        proc.wait()
        # The run folder is usable after every kill: its newest checkpoint loads, and it is never older.
        loaded = checkpoints.load_latest()
        step = loaded[0]["step"] if loaded else 0
        assert step >= latest_steps[-1], f"kill {kill}: resume would go back from {latest_steps[-1]} to {step}"
        latest_steps.append(step)
    run_to_end(start_training(store, run, config_file))

    assert not list(run.glob("*.corrupt")), "a kill must not leave a checkpoint that reads as damaged"
    history = read_history(run)
    assert history[-1]["step"] == TOTAL_STEPS and history[-1]["stopped_by"] == "total_steps"
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert_same_weights(final_weights(run), final_weights(tmp_path / "reference"))
    assert phases.count("after the end") <= 1 and len(set(latest_steps[1:])) >= 4, (phases, latest_steps)
    print(f"\nreference: start-up {times['startup']:.1f} s, {times['per_step'] * 1000:.0f} ms/step, "
          f"tail {times['tail']:.1f} s; {KILLS} kills, phases: "
          f"{json.dumps({p: phases.count(p) for p in sorted(set(phases))})}; checkpoint step after each: "
          f"{latest_steps[1:]}")
