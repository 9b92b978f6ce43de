"""A real S3 API server on loopback for the tests: moto's standalone server (`moto[server]`), in its own process.

`S3Server.start()` picks a free port, starts `python -m moto.server` and waits until it answers; `env()` is the
environment a client needs (the standard AWS variables, with `AWS_ENDPOINT_URL` pointing at the server), and
`make_bucket` creates a bucket through the S3 API. The credentials are moto's throwaway test values.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

TEST_ACCESS_KEY = "fvlm-test-access-key"
TEST_SECRET_KEY = "fvlm-test-secret-do-not-log-0123456789"  # the secrets tests look for this string in logs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's S3 server in a child process, listening on 127.0.0.1 only."""

    def __init__(self, port: int, process: subprocess.Popen):
        self.port = port
        self.process = process
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, timeout_s: float = 60.0) -> "S3Server":
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(port, process)
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto's S3 server exited with {process.returncode} before answering")
            try:
                httpx.get(f"{server.endpoint}/moto-api/", timeout=2.0)
                return server
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"moto's S3 server did not answer on port {port} within {timeout_s} s")
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, name: str) -> str:
        """Create a bucket (idempotent) and return its s3:// URL."""
        import s3fs

        with _env(self.env()):
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            if not fs.exists(name):
                fs.mkdir(name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset call)."""
        httpx.post(f"{self.endpoint}/moto-api/reset", timeout=10.0)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
