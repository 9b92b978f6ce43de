"""One training chunk as a torch.distributed job of config.nproc processes on this host: what `torchrun
--standalone --nproc-per-node N` runs, started through torch's elastic launcher from inside the train-chunk task.

    train_chunk (holds the run folder's lock) -> launch_chunk -> elastic agent -> N x chunk_worker (rank r)

Each rank trains through DistributedDataParallel on its contiguous slice of every global batch (batch_size / N
rows, the same global order as one process), so the data order, the checkpointed position and an exact resume do
not depend on N: a chunk started with N = 2 may resume with N = 1. On a GPU host rank r uses cuda:r of the visible
devices (nccl); on a CPU, gloo. Rank 0 alone writes checkpoints, history.jsonl and wandb and logs; the others log
warnings only.

Failures end the job within a bounded time and leave the checkpoints as they were: the agent watches its workers
every second and, with max_restarts=0, stops all of them when one dies; a rank that hangs leaves the others
waiting in a collective for at most dist_timeout_s before they fail. The next chunk resumes from the last
checkpoint, as after any kill.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from tasks.ranks import Ranks
from tasks.runtime import PROGRESS_ENV, resolve_device
from tasks.train_config import TrainConfig

log = logging.getLogger(__name__)

# The agent leaves SIGTERM to the workers: a cancelled flow run's SIGTERM reaches every process of its group, and
# each rank asks its loop to stop (they agree on the step), checkpoints and records the chunk as cancelled.
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


class DistributedChunkError(RuntimeError):
    """A rank of a multi-process chunk failed; the checkpoints are those of before the failure."""


def check_devices(config: TrainConfig) -> str:
    """'cuda' or 'cpu' for a job of config.nproc processes, or an error that says what to change."""
    device = resolve_device(config.device)
    if device == "cpu":
        return "cpu"
    if ":" in device:
        raise DistributedChunkError(f"device {config.device} names one GPU but nproc is {config.nproc}: rank r uses "
                                    f"cuda:r of the visible GPUs; set --device cuda and CUDA_VISIBLE_DEVICES")
    visible = torch.cuda.device_count()
    if visible < config.nproc:
        raise DistributedChunkError(
            f"nproc {config.nproc} needs {config.nproc} GPUs, {visible} visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): lower --nproc or give the worker more GPUs")
    return "cuda"


def launch_chunk(store_path: str, run_dir: Path, config: TrainConfig, resume: str | None,
                 worker: Callable[..., Any] | None = None) -> Any:
    """Train one chunk with config.nproc processes on this host and return rank 0's ChunkResult. `worker`: the
    processes' function, chunk_worker's signature (tests wrap it to simulate a fault inside one rank)."""
    from tasks.training import ChunkResult

    check_devices(config)
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=config.nproc, run_id=f"fvlm-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone: a store on a free port
        max_restarts=0, monitor_interval=1.0, start_method="spawn", signals_to_handle=AGENT_SIGNALS)
    log.info("chunk as a job of %d processes (%s)", config.nproc, launch.run_id)
    with _agent_signals():
        try:
            job = elastic_launch(launch, worker or chunk_worker)
            results = job(store_path, str(run_dir), config.model_dump(mode="json"), resume)
        except ChildFailedError as err:
            raise DistributedChunkError(describe_failure(err, run_dir)) from err
    return ChunkResult(**results[0])


@contextmanager
def _agent_signals() -> Iterator[None]:
    """The launcher sets the signals its agent handles through the environment and installs its handlers for
    them in this process; put both back afterwards (the flow run's, the command line's)."""
    name = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    before = os.environ.get(name)
    in_main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in _signals(AGENT_SIGNALS)} if in_main else {}
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _signals(names: str) -> list[signal.Signals]:
    return [getattr(signal, name) for name in names.split(",")]


def describe_failure(err: ChildFailedError, run_dir: Path) -> str:
    """Which ranks failed and how (the exception, or the signal that ended it), the first one first."""
    first, _ = err.get_first_failure()
    parts = []
    for rank in sorted(err.failures, key=lambda r: (r != first, r)):
        failure = err.failures[rank]
        what = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        if failure.exitcode < 0:
            what = f"killed by {failure.signal_name()}"
        parts.append(f"rank {rank}: {what or f'exit code {failure.exitcode}'}")
    return (f"the chunk's job failed ({'; '.join(parts)}); the launcher stopped the other ranks and nothing after "
            f"the last checkpoint in {run_dir} was kept: run the chunk again (any nproc) to resume from there")


@record
def chunk_worker(store_path: str, run_dir: str, config_json: dict[str, Any], resume: str | None) -> Any:
    """One rank of the chunk (started by the elastic agent, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    rank 0 returns the ChunkResult as a dict, the others None."""
    from storage.run_folder import RunFolder
    from tasks.training import stop_on_sigterm, train_in_folder

    config = TrainConfig.model_validate(config_json)
    ranks = join_job(config)
    quiet_unless_main(ranks)
    try:
        with stop_on_sigterm() as stop:
            result = train_in_folder(RunFolder(run_dir), store_path, config, resume, stop, ranks)
        return result.as_dict() if ranks.is_main else None
    finally:
        dist.destroy_process_group()


def join_job(config: TrainConfig) -> Ranks:
    """This process's rank, its device and the process groups (nccl and a gloo control group, or gloo only)."""
    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    timeout = timedelta(seconds=config.dist_timeout_s)
    if check_devices(config) == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
        dist.init_process_group("gloo", timeout=timeout)
        control = None  # the default group is gloo already
    return Ranks(rank=rank, world=world, device=device, control=control)


def quiet_unless_main(ranks: Ranks) -> None:
    """Rank 0 logs as the command line does; the other ranks only warnings, and draw no progress bar."""
    logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING,
                        format=f"%(asctime)s rank {ranks.rank} %(levelname)s %(name)s: %(message)s")
    if not ranks.is_main:
        os.environ[PROGRESS_ENV] = "0"
