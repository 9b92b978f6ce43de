"""Test-wide settings: no network, wandb offline, a private Prefect home, shared fixtures."""

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports prefect, transformers or wandb: they read these at import time.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="fvlm-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_HOME / "prefect" / "results")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = Path(os.environ.get("FVLM_SHARED_VIDEOS", REPO_ROOT.parent / "shared" / "data" / "videos"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real sample videos of ../shared/data/videos (skips when the folder is absent)."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"no shared sample videos at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (own database and home) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on loopback for the session (tests/s3_server.py)."""
    from tests.s3_server import S3Server

    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the test server, and a fresh bucket: yields its s3:// URL."""
    import uuid

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server.make_bucket(f"fvlm-{uuid.uuid4().hex[:12]}")
