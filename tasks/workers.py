"""A supervised pool of spawned worker processes: a timeout per job, and a worker that hangs or dies is replaced.

`WorkerPool(fn, ...)` runs `fn(job, **kwargs)` in `workers` processes fed from a queue; `submit(key, job)` returns
at once and `get(key)` waits for that key's `JobResult`. It knows nothing about what the jobs are: the decode
pool (`tasks.decode.DecodePool`) is this pool bound to `read_clip`.

Why our own pool and not multiprocessing.Pool, concurrent.futures or pebble:
- A job may hang forever in native code holding the GIL (decord issue 373) or crash its process (SIGSEGV). A
  supervisor thread in the parent measures each job's time, kills (SIGKILL: a thread stuck in native code
  ignores anything gentler) and replaces a worker that overruns the timeout or dies, and turns that job into
  an error result with a reason, so one bad input never stops a batch. concurrent.futures breaks the whole
  pool when a worker dies and has no per-job timeout.
- Workers are spawned, not forked: the parent has torch and threads, which fork would copy in an undefined state.
- Results come back as raw bytes over a pipe, not pickled: 1.7 ms per 24x256x256x3 uint8 clip against 15 ms.
  benchmarks/decode_pool.py compares this pool with pebble's ProcessPool (per-job timeout, worker replacement,
  results pickled), 2 workers on a busy 2-core machine, 8 runs: returning a ready-made clip, 2-17 ms per clip
  here against 10-24 ms with pebble (pebble 2.2-4.9x slower in 7 runs of 8); decoding 16 clips of 320x240
  H.264, 22-39 ms against 24-41 ms (pebble 0.92-1.23x, slower in 6 runs of 8). And pebble reports workers that
  cannot start as "BrokenProcessPool: All workers expired", without naming the function they failed to import.

`fn` returns a numeric numpy array, or a tuple (a NamedTuple such as `Clip(frames, interval_s)`) whose first item
is one; the array travels as raw bytes, the other items pickled, and `JobResult.value` is rebuilt as the same type.
`fn`, the NamedTuple and the `expected` exception types must be module-level (spawned workers import them by name).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """The outcome of one job: `value` (an array, or the tuple `fn` returned), or the reason it failed."""

    key: Hashable
    value: Any
    error: str | None
    seconds: float


class WorkerPoolError(RuntimeError):
    """The pool itself cannot run (workers do not start, or it was closed): not a problem of one job."""


class Messages(NamedTuple):
    """How the pool words the failures it sees itself; a job's own exception is worded by the job."""

    timeout: str = "job timed out after {timeout_s:g} s"
    died: str = "worker process died ({reason})"
    start: str = ("workers exit while starting ({reason}): {fn} and the modules it needs must import in a fresh "
                  "Python process (workers are spawned); see the worker's stderr")


# ---- the worker process --------------------------------------------------------------------------------


def _split(result: Any, fn_name: str) -> tuple[np.ndarray, bytes]:
    """(C-contiguous array, pickled (tuple type, other items) or None) of what `fn` returned."""
    rest: tuple[type, tuple] | None = None
    if isinstance(result, tuple) and result and isinstance(result[0], np.ndarray):
        result, rest = result[0], (type(result), tuple(result[1:]))
    if not isinstance(result, np.ndarray) or result.dtype == object:
        raise TypeError(f"{fn_name} returned {type(result).__name__}, not a numeric numpy array "
                        f"(or a tuple whose first item is one)")
    return np.ascontiguousarray(result), pickle.dumps(rest)


def _rebuild(array: np.ndarray, rest: tuple[type, tuple] | None) -> Any:
    if rest is None:
        return array
    kind, items = rest
    return kind._make((array, *items)) if hasattr(kind, "_make") else kind((array, *items))


def _run_job(conn: Connection, fn: Callable, kwargs: dict, expected: tuple[type[BaseException], ...],
             key: Hashable, job: Any) -> None:
    """Run one job and send ('ok', key, seconds, shape, dtype, rest) + raw bytes, or ('error', key, reason, seconds)."""
    started = time.perf_counter()
    try:
        array, rest = _split(fn(job, **kwargs), getattr(fn, "__name__", "the function"))
    except expected as err:  # a bad input is data: its message is the reason
        conn.send(("error", key, str(err), time.perf_counter() - started))
        return
    except Exception as err:  # the worker must survive a bad input: the failure becomes that job's error
        log.warning("unexpected error in job %r (%s): %r", key, job, err)
        conn.send(("error", key, f"unexpected {type(err).__name__}: {err}", time.perf_counter() - started))
        return
    conn.send(("ok", key, time.perf_counter() - started, array.shape, array.dtype.str, rest))
    conn.send_bytes(memoryview(array).cast("B"))  # raw bytes: 1.7 ms per 24x256x256x3 clip, pickle 15 ms


def _worker_main(conn: Connection, fn: Callable, kwargs: dict, expected: tuple[type[BaseException], ...]) -> None:
    """Worker loop: say 'ready', then run (key, job) pairs until None or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then closes the pool
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        _run_job(conn, fn, kwargs, expected, *message)


# ---- the parent side -----------------------------------------------------------------------------------


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    job: tuple[Hashable, Any] | None = None  # (key, job) being run
    started: float = 0.0  # time.monotonic() when the job was sent


def exit_reason(exitcode: int | None) -> str:
    """'signal 11, SIGSEGV' / 'exit code 1' for a process's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _qualified_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


class WorkerPool:
    """`workers` spawned processes running `fn(job, **kwargs)`, one job at a time each; results collected by key.

    submit() returns at once; a supervisor thread hands jobs to idle workers, enforces `timeout_s` per job and
    replaces workers that are killed or die, so work goes on while the caller does something else. get(key)
    waits for that key's result. Exceptions of the `expected` types become errors with their message alone;
    others "unexpected <type>: <message>". `name` names the threads, processes and the pool in messages.
    """

    def __init__(self, fn: Callable, workers: int = 2, timeout_s: float = 60.0, kwargs: dict | None = None,
                 expected: tuple[type[BaseException], ...] = (), name: str = "worker",
                 messages: Messages = Messages()):
        if workers < 1 or not timeout_s > 0:
            raise ValueError(f"a pool needs workers >= 1 and timeout_s > 0, not {workers} and {timeout_s}")
        if "<" in getattr(fn, "__qualname__", ""):  # <lambda>, <locals>: spawned workers cannot import it
            raise ValueError(f"{_qualified_name(fn)} must be a module-level function: spawned workers import it")
        self.fn, self.workers, self.timeout_s, self.name, self.messages = fn, workers, timeout_s, name, messages
        self._args = (fn, dict(kwargs or {}), tuple(expected))
        self._ctx = mp.get_context("spawn")
        self._cond = threading.Condition()
        self._pending: deque[tuple[Hashable, Any]] = deque()
        self._waiting: set[Hashable] = set()  # submitted, not yet collected by get()
        self._results: dict[Hashable, JobResult] = {}
        self._failure: str | None = None
        self._start_failures = 0
        self._closed = False
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._workers = [self._spawn() for _ in range(workers)]
        self._thread = threading.Thread(target=self._supervise, name=f"{name}-pool", daemon=True)
        self._thread.start()

    # -- public API --

    def submit(self, key: Hashable, job: Any) -> None:
        """Queue one job; its result is collected later with get(key)."""
        with self._cond:
            if self._closed:
                raise WorkerPoolError(f"the {self.name} pool is closed")
            if key in self._waiting:
                raise ValueError(f"key {key!r} was submitted already and its result not collected yet")
            self._waiting.add(key)
            self._pending.append((key, job))
        self._wake()

    def get(self, key: Hashable) -> JobResult:
        """Wait for the result of `key` (each job takes at most about timeout_s once it started)."""
        with self._cond:
            if key not in self._waiting:
                raise KeyError(f"key {key!r} was not submitted, or its result was collected already")
            while key not in self._results:
                if self._failure is not None:
                    raise WorkerPoolError(self._failure)
                if self._closed:
                    raise WorkerPoolError(f"the {self.name} pool was closed before job {key!r} finished")
                self._cond.wait(timeout=1.0)
            self._waiting.discard(key)
            return self._results.pop(key)

    def close(self) -> None:
        """Stop the workers; jobs not yet done are dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake()
        self._thread.join(timeout=10)
        for worker in self._workers:
            if worker.job is None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            else:  # busy on a job nobody will collect
                worker.process.kill()
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- supervisor (its own thread; every state change under self._cond) --

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, name=f"{self.name}-worker", daemon=True,
                                    args=(child, *self._args))
        process.start()
        child.close()
        return _Worker(process, parent)

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:  # closed already
            pass

    def _supervise(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closed:
                        return
                    self._dispatch()
                    watched = [self._wake_r] + [w.conn for w in self._workers]
                    watched += [w.process.sentinel for w in self._workers]
                    timeout = self._seconds_to_next_deadline()
                ready = wait(watched, timeout)
                with self._cond:
                    if self._closed:
                        return
                    self._handle(ready)
        except Exception as err:  # without the supervisor get() would wait forever: record why and wake it
            log.exception("%s pool supervisor failed", self.name)
            with self._cond:
                self._failure = f"{self.name} pool supervisor failed: {err!r}"
                self._cond.notify_all()

    def _handle(self, ready: list) -> None:
        """Drain the wake pipe, take the workers' messages and exits, kill the ones past their deadline."""
        while self._wake_r.poll():
            self._wake_r.recv_bytes()
        for worker in list(self._workers):
            pipe_open = self._receive(worker) if worker.conn in ready else True
            if not pipe_open or worker.process.sentinel in ready:
                self._on_exit(worker)
        self._enforce_timeouts()

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not self._pending:
                return
            if worker.ready and worker.job is None and worker.process.is_alive():
                job = self._pending.popleft()
                try:
                    worker.conn.send(job)
                except OSError:  # died just now; its sentinel will report it
                    self._pending.appendleft(job)
                    continue
                worker.job, worker.started = job, time.monotonic()

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = [w.started + self.timeout_s for w in self._workers if w.job is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message of a worker; False when its pipe is closed (it died, maybe mid-message)."""
        try:
            message = worker.conn.recv()
            if message[0] == "ready":
                worker.ready = True
                self._start_failures = 0
            elif message[0] == "ok":
                _, key, seconds, shape, dtype, rest = message
                array = np.empty(shape, np.dtype(dtype))
                worker.conn.recv_bytes_into(memoryview(array).cast("B"))
                self._finish(worker, JobResult(key, _rebuild(array, pickle.loads(rest)), None, seconds))
            else:
                _, key, error, seconds = message
                self._finish(worker, JobResult(key, None, error, seconds))
        except (EOFError, OSError):
            return False
        return True

    def _finish(self, worker: _Worker, result: JobResult) -> None:
        worker.job = None
        self._results[result.key] = result
        self._cond.notify_all()

    def _on_exit(self, worker: _Worker) -> None:
        """A worker exited (or closed its pipe): report its job as failed and start another."""
        while worker.job is not None and self._poll(worker) and self._receive(worker):
            pass  # a result sent just before it exited still counts
        worker.process.join(timeout=5)
        if worker.process.is_alive():  # closed its pipe but lingers: it is of no use any more
            worker.process.kill()
            worker.process.join(timeout=5)
        reason = exit_reason(worker.process.exitcode)
        if worker.job is not None:
            key, job = worker.job
            log.warning("%s worker died on %s (%s); starting another", self.name, job, reason)
            self._finish(worker, JobResult(key, None, self.messages.died.format(reason=reason),
                                           time.monotonic() - worker.started))
        elif not worker.ready:
            self._start_failures += 1
            if self._start_failures >= 3:
                self._failure = self.messages.start.format(reason=reason, fn=_qualified_name(self.fn))
                self._cond.notify_all()
        self._replace(worker)

    @staticmethod
    def _poll(worker: _Worker) -> bool:
        try:
            return worker.conn.poll()
        except (EOFError, OSError):
            return False

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job is not None and now - worker.started > self.timeout_s:
                key, job = worker.job
                log.warning("%s job %s took over %g s; killing its worker (pid %s)",
                            self.name, job, self.timeout_s, worker.process.pid)
                worker.process.kill()  # SIGKILL: a job stuck in native code ignores anything gentler
                worker.process.join(timeout=5)
                self._finish(worker, JobResult(key, None, self.messages.timeout.format(timeout_s=self.timeout_s),
                                               now - worker.started))
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.conn.close()
        index = self._workers.index(worker)
        if self._failure is None and not self._closed:
            self._workers[index] = self._spawn()
        else:
            del self._workers[index]
