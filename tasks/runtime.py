"""Small runtime helpers shared by tasks: device choice, progress bars, where the project's logs go."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from tqdm import tqdm

PROGRESS_ENV = "FVLM_PROGRESS"  # set to 1 by the command line (this module stays light for it: torch is imported
#                                 where a device is resolved)


def progress_bar(**kwargs: Any) -> tqdm:
    """A progress bar on stderr when the command line asked for one and stderr is a terminal, else a silent one.

    Deployments and tests leave it off: their progress is in logs and Prefect artifacts.
    """
    enabled = os.environ.get(PROGRESS_ENV) == "1" and sys.stderr.isatty()
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def resolve_device(name: str = "auto") -> str:
    """'auto' picks the first GPU when there is one; anything else is checked and returned as is."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA device is visible (set --device cpu or auto)")
    return name


PROJECT_LOGGERS = ("flows", "tasks", "storage", "model")


class _InRun(logging.Filter):
    """Only records logged inside a flow or task run: the API stores a log only with the run it belongs to."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def send_logs_to_prefect(level: int = logging.INFO) -> None:
    """Attach Prefect's API log handler to the project's loggers, once per process.

    Without it only `get_run_logger()` lines reach the Prefect UI; with it a training task's run also shows its
    step lines and warnings (a damaged checkpoint skipped, a batch split after running out of memory) and a
    precompute run its failed videos. Called when a flow module is imported, which is how both the command line
    and a worker's flow-run process start a run. Records from outside a run (the command line before its flow
    starts, decode worker processes) stay local.
    """
    from prefect.logging.handlers import APILogHandler

    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(handler, "_fvlm", False) for handler in logger.handlers):
            continue
        handler = APILogHandler(level=level)
        handler.addFilter(_InRun())
        handler._fvlm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:  # a worker's root logger is at WARNING: let INFO through to the API
            logger.setLevel(level)


def retry_unless(*permanent: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect retry condition: retry transient failures, not the `permanent` errors (a manifest that cannot be
    used, a full disk, a read-only store need a person first, and a retry only makes them wait)."""

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - no exception to look at: keep the retry policy
            return True
        return not isinstance(error, permanent)

    should_retry.__name__ = f"retry_unless_{'_or_'.join(e.__name__ for e in permanent)}"
    return should_retry
