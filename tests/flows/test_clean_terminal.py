"""What a user's terminal gets from `fvlm` with no Prefect server configured: the temporary server's shutdown
noise is dropped, real errors are not, and a server that does not start is one line with what to do."""

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.server_logging import is_shutdown_cancellation

REPO = Path(__file__).resolve().parents[2]


def record_from(logger: str, error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:  # noqa: BLE001 - the record carries it
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, "Error flushing 1 events", None, sys.exc_info())


def test_only_a_cancellation_of_the_logging_task_itself_is_dropped():
    recorder = "prefect.server.services.task_run_recorder"

    async def logged_while(cancelled: bool, logger: str, error: BaseException) -> bool:
        task = asyncio.current_task()
        if cancelled:
            task.cancel()  # what a service's stop() does to its consumer task
        dropped = is_shutdown_cancellation(record_from(logger, error))
        if cancelled:
            try:
                await asyncio.sleep(0)  # the cancellation arrives here: taken back, so the test's loop ends well
            except asyncio.CancelledError:
                task.uncancel()
        return dropped

    run = asyncio.run
    assert run(logged_while(True, recorder, asyncio.CancelledError()))  # the shutdown noise
    assert not run(logged_while(False, recorder, asyncio.CancelledError()))  # a driver's own CancelledError
    assert not run(logged_while(True, recorder, RuntimeError("disk I/O error")))  # a real error
    assert not run(logged_while(True, "tasks.precompute", asyncio.CancelledError()))  # not the server's
    assert not is_shutdown_cancellation(record_from(recorder, asyncio.CancelledError()))  # no event loop


def temporary_server_env(tmp_path: Path, **extra: str) -> dict:
    """No PREFECT_API_URL: the command starts Prefect's temporary server, as on a user's fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), HOME=str(tmp_path), PYTHONPATH=str(REPO), **extra)
    return env


@pytest.mark.slow
def test_a_server_that_does_not_start_is_one_line_with_what_to_do(tmp_path):
    (tmp_path / "videos").mkdir()
    env = temporary_server_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "precompute", "--manifest", str(tmp_path / "videos"),
                          "--store", str(tmp_path / "s.zarr"), "--preset", "demo"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "PREFECT_API_URL" in errors[0] and "prefect server start" in errors[0]


@pytest.mark.slow
def test_precompute_of_the_shared_videos_ends_with_its_summary_and_no_traceback(tmp_path, shared_videos):
    env = temporary_server_env(tmp_path)
    run = subprocess.run([sys.executable, "-m", "flows.cli", "precompute", "--manifest", str(shared_videos),
                          "--store", str(tmp_path / "s.zarr"), "--preset", "demo", "--min-duration", "0",
                          "--max-duration", "100000"], env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "stderr.log").write_text(run.stderr)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "CancelledError" not in run.stderr
    last = run.stdout.strip().splitlines()
    assert last[0].startswith("store") and last[-1].lstrip().startswith(("videos", "failed")), run.stdout
