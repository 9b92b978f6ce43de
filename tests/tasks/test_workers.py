"""The generic worker pool: arrays back by key, tuples rebuilt, hangs time out, crashes are replaced, clear errors."""

import os
import signal
import sys
import time
import types
from typing import NamedTuple

import numpy as np
import pytest

from tasks.workers import JobResult, Messages, WorkerPool, WorkerPoolError, exit_reason

# Job functions for the workers: module level, so that a spawned worker can import them by name.


class BadInput(Exception):
    """An input the job cannot handle: data, its message is the reason."""


class Labelled(NamedTuple):
    values: np.ndarray
    label: str
    scale: float


def fill(job, shape=(2, 3), scale=1):
    """An int16 array of `shape` filled with job * scale; hangs, crashes or raises on the named jobs."""
    if job == "hang":
        time.sleep(3600)
    if job == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if job == "exit":
        os._exit(3)
    if job == "bad":
        raise BadInput("no such input")
    if job == "odd":
        raise ValueError("something odd")
    if job == "none":
        return None
    return np.full(shape, job * scale, np.int16)


def labelled(job, shape=(4,)):
    """A NamedTuple whose first item is the array: it comes back as the same type."""
    return Labelled(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + job, f"job {job}", 0.5)


def pid(job):
    return np.array([os.getpid()], np.int64)


def test_arrays_come_back_by_key_with_the_kwargs_applied():
    with WorkerPool(fill, workers=2, timeout_s=30, kwargs={"shape": (3, 5), "scale": 10}) as pool:
        for i in range(12):
            pool.submit(f"k{i}", i)
        results = [pool.get(f"k{i}") for i in range(12)]
    for i, result in enumerate(results):
        assert isinstance(result, JobResult) and result.key == f"k{i}" and result.error is None
        assert result.value.shape == (3, 5) and result.value.dtype == np.int16 and result.seconds >= 0
        assert np.all(result.value == 10 * i)


def test_a_named_tuple_comes_back_as_itself():
    with WorkerPool(labelled, workers=1, timeout_s=30, kwargs={"shape": (2, 3)}) as pool:
        pool.submit("a", 7)
        value = pool.get("a").value
    assert isinstance(value, Labelled) and value.label == "job 7" and value.scale == 0.5
    np.testing.assert_array_equal(value.values, np.arange(6, dtype=np.float32).reshape(2, 3) + 7)


def test_a_hung_job_times_out_and_the_next_ones_run():
    with WorkerPool(fill, workers=1, timeout_s=1.0) as pool:
        for key, job in [("hung", "hang"), ("next", 4), ("after", 5)]:
            pool.submit(key, job)
        started = time.perf_counter()
        hung = pool.get("hung")
        waited = time.perf_counter() - started
        after = [pool.get("next"), pool.get("after")]
    assert hung.value is None and hung.error == "job timed out after 1 s"
    assert 0.9 < waited < 10 and hung.seconds >= 1.0
    assert [int(r.value.max()) for r in after] == [4, 5]


def test_crashes_and_exceptions_become_errors_with_their_reason():
    with WorkerPool(fill, workers=1, timeout_s=30, expected=(BadInput,)) as pool:
        jobs = {"a": 1, "crash": "crash", "exit": "exit", "bad": "bad", "odd": "odd", "none": "none", "b": 2}
        for key, job in jobs.items():
            pool.submit(key, job)
        results = {key: pool.get(key) for key in jobs}
    assert results["crash"].error == "worker process died (signal 11, SIGSEGV)"
    assert results["exit"].error == "worker process died (exit code 3)"
    assert results["bad"].error == "no such input"  # an expected exception: its message alone
    assert results["odd"].error == "unexpected ValueError: something odd"
    assert results["none"].error.startswith("unexpected TypeError: fill returned NoneType, not a numeric numpy")
    assert int(results["a"].value.max()) == 1 and int(results["b"].value.max()) == 2


def test_the_caller_words_the_pools_own_failures():
    messages = Messages(timeout="took over {timeout_s:g} s", died="it died: {reason}")
    with WorkerPool(fill, workers=1, timeout_s=0.5, messages=messages) as pool:
        pool.submit("hung", "hang")
        pool.submit("crash", "crash")
        assert pool.get("hung").error == "took over 0.5 s"
        assert pool.get("crash").error == "it died: signal 11, SIGSEGV"


def test_a_killed_idle_worker_is_replaced():
    with WorkerPool(pid, workers=1, timeout_s=10) as pool:
        pool.submit("before", None)
        first = int(pool.get("before").value[0])
        os.kill(first, signal.SIGKILL)  # dies while idle: replaced, no job lost
        time.sleep(0.2)
        pool.submit("after", None)
        second = int(pool.get("after").value[0])
    assert first != second


def test_workers_that_cannot_start_fail_loudly_naming_the_function(monkeypatch):
    phantom = types.ModuleType("phantom_jobs")  # exists in this process only: spawned workers cannot import it
    exec("def run(job):\n    return None", phantom.__dict__)
    monkeypatch.setitem(sys.modules, "phantom_jobs", phantom)
    with WorkerPool(phantom.run, workers=1, timeout_s=30, name="test") as pool:
        pool.submit("a", 1)
        with pytest.raises(WorkerPoolError, match=r"^workers exit while starting \(exit code 1\): phantom_jobs\.run"):
            pool.get("a")


def test_misuse_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="must be a module-level function"):
        WorkerPool(lambda job: job)
    with pytest.raises(ValueError, match="workers >= 1 and timeout_s > 0"):
        WorkerPool(fill, workers=0)
    pool = WorkerPool(fill, workers=1, timeout_s=30, name="test")
    pool.submit("a", 1)
    with pytest.raises(ValueError, match="submitted already"):
        pool.submit("a", 1)
    assert int(pool.get("a").value.max()) == 1
    with pytest.raises(KeyError):
        pool.get("a")  # collected already
    pool.close()
    with pytest.raises(WorkerPoolError, match="the test pool is closed"):
        pool.submit("b", 2)


def test_exit_reasons_name_the_signal():
    assert exit_reason(-9) == "signal 9, SIGKILL"
    assert exit_reason(1) == "exit code 1"
