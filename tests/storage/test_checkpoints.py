import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from storage.checkpoints import CheckpointError, CheckpointStore
from storage.runlock import RunLock, RunLockedError


def test_save_latest_load_and_prune(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None
    for step in (5, 10, 15):
        store.save({"step": step, "w": torch.full((3,), float(step))}, step)
    assert store.steps() == [10, 15]
    assert store.latest().name == "checkpoint-000000015.pt"
    state = store.load()
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((3,), 15.0))
    assert store.load(store.path_for(10))["step"] == 10
    assert not list(tmp_path.glob("*.tmp"))


def test_latest_ignores_partial_and_foreign_files(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save({"step": 1}, 1)
    (tmp_path / ".checkpoint-abc.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint-latest.pt").write_bytes(b"not ours")
    assert store.latest() == store.path_for(1)


def test_load_is_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "checkpoint-000000001.pt"
    torch.save({"evil": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        CheckpointStore(tmp_path).load(path)


def test_missing_checkpoint_messages(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        CheckpointStore(tmp_path).load()
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointStore(tmp_path).load(tmp_path / "nope.pt")


def _hold_lock(run_dir, ready):
    with RunLock(run_dir):
        ready.set()
        time.sleep(60)


def test_run_lock_excludes_a_second_trainer_and_is_freed_by_a_kill(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError, match=f"pid.*{holder.pid}|{holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock
        pass
