"""The temporary Prefect server's console: a service stopped at shutdown prints no traceback.

`fvlm` without PREFECT_API_URL starts Prefect's temporary server in a subprocess that shares the terminal's
stderr. When the command ends, Prefect terminates it (SIGTERM) and its services' stop() cancels their consumer
tasks; a cancellation that lands while the task-run recorder is writing a batch is logged as
"Error flushing N events" with a full CancelledError traceback (prefect/server/services/task_run_recorder.py,
flush()). The cli points Prefect's console handler at this class (PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS) so the
server process drops those records and nothing else: any other server error, and a CancelledError that does not
come from cancelling the logging task itself (a database driver can raise one), still print.
"""

from __future__ import annotations

import asyncio
import logging

from prefect.logging.handlers import PrefectConsoleHandler

def is_shutdown_cancellation(record: logging.LogRecord) -> bool:
    """A server-side record whose exception is the cancellation of the very task that logs it."""
    if not record.name.startswith(("prefect.server.", "uvicorn")) or not record.exc_info:
        return False
    if not isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return False
    return task is not None and task.cancelling() > 0


class ServerConsoleHandler(PrefectConsoleHandler):
    """Prefect's console handler, less the tracebacks of services cancelled at shutdown."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.addFilter(lambda record: not is_shutdown_cancellation(record))
