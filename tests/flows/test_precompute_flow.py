"""The precompute flow end to end: real videos, real decoding, the demo encoders, a real Zarr store, a real
Prefect server (the session's test harness)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage.store import FAILED, OK, PENDING, FeatureStore
from tasks.samples import iso_duration, make_video, write_manifest

pytestmark = pytest.mark.slow


def write_collection(folder: Path, shared_videos: Path | None) -> Path:
    """Eight small videos inside 20-60 s (two containers), one too short, one too long, and a corrupt one."""
    rows = []
    plan = [(21, ".mp4"), (25, ".mkv"), (30, ".mp4"), (33, ".webm"), (40, ".mp4"), (44, ".mp4"), (52, ".mkv"),
            (60, ".mp4"), (12, ".mp4"), (75, ".mp4")]
    for i, (seconds, suffix) in enumerate(plan):
        name = f"videos/v{i:02d}{suffix}"
        make_video(folder / name, seconds, fps=2, size=(64, 48), seed=i)
        rows.append({"videoid": f"v{i:02d}", "contentUrl": name, "duration": iso_duration(seconds),
                     "name": f"clip {i}"})
    if shared_videos is not None:
        shutil.copy(shared_videos / "decord_corrupted.mp4", folder / "videos" / "corrupt.mp4")
        rows.append({"videoid": "corrupt", "contentUrl": "videos/corrupt.mp4", "duration": "PT00H00M25S",
                     "name": "a corrupt file with a believable duration"})
    return write_manifest(folder / "manifest.csv", rows)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from tests.conftest import SHARED_VIDEOS

    folder = tmp_path_factory.mktemp("collection")
    return write_collection(folder, SHARED_VIDEOS if SHARED_VIDEOS.is_dir() else None)


def precompute_command(manifest: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "precompute", "--manifest", str(manifest), "--store", str(store),
            "--preset", "demo", "--device", "cpu", "--chunk-videos", "2", "--decode-workers", "1"]


def cli_env(tmp_path: Path) -> dict:
    """The CLI talks to the harness's server, so no temporary server is started per run."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "home"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def assert_same_store(a: Path, b: Path) -> None:
    """Row for row: same ids, captions, status and error reasons; features equal up to float16 rounding."""
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    for column in ("video_id", "caption", "source", "error"):
        assert list(x.read_column(column)) == list(y.read_column(column)), column
    assert np.array_equal(x.read_status(), y.read_status())
    for name in ("dino_features", "latents"):
        fx, fy = np.asarray(x.group[name][:], np.float32), np.asarray(y.group[name][:], np.float32)
        assert np.allclose(fx, fy, rtol=2e-3, atol=2e-3), name


def test_flow_fills_the_store_and_leaves_artifacts(collection, tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.precompute import precompute_flow
    from model.encoders import EncoderConfig
    from storage.store import StoreConfig
    from tasks.decode import DecodeConfig

    state = precompute_flow(manifest=str(collection), store=str(tmp_path / "s.zarr"),
                            encoder=EncoderConfig(preset="demo"), decode=DecodeConfig(workers=1),
                            layout=StoreConfig(chunk_videos=4), device="cpu", return_state=True)
    assert state.is_completed()
    info = state.result()
    has_corrupt = (collection.parent / "videos" / "corrupt.mp4").exists()
    assert info["listing"]["dropped"]["too_short"] == 1 and info["listing"]["dropped"]["too_long"] == 1
    assert info["ok"] == 8 and info["failed"] == int(has_corrupt) and info["pending"] == 0
    store = FeatureStore.open(tmp_path / "s.zarr")
    ok = store.read_status() == OK
    features = np.asarray(store.group["dino_features"][:])
    assert features.shape[1:] == (24, 325, 384) and features.dtype == np.float16
    assert np.abs(features[ok]).mean() > 0.01  # written, not the fill value
    assert store.group["latents"].shape[1:] == (24, 4, 32, 32)
    assert store.attrs["dino"]["id"] == "demo:sincos-dinov2" and store.attrs["listing"]["kept"] == 8 + has_corrupt
    if has_corrupt:
        reason = store.read_column("error")[store.read_status() == FAILED][0]
        assert "frame" in reason or "decode" in reason.lower()

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_type = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    assert by_type["progress"][0].data == 100.0
    table = next(a for a in by_type["table"] if a.key == "precompute-report")
    assert "dropped: too_short" in str(table.data) and "videos/s" in str(table.data)
    if has_corrupt:  # the project's own warning reaches the run's logs in the UI, not only the local console
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        assert any("corrupt.mp4) failed:" in entry.message for entry in logs)


def test_killed_run_resumes_to_the_same_store(collection, tmp_path, prefect_harness):
    env = cli_env(tmp_path)
    reference = tmp_path / "reference.zarr"
    done = subprocess.run(precompute_command(collection, reference), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    store = tmp_path / "killed.zarr"
    for kill_after_commits in (1, 3):  # kill twice: after the first commit, then later in the rerun
        proc = subprocess.Popen(precompute_command(collection, store), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if FeatureStore.exists(store) and (FeatureStore.open(store).read_status() != PENDING).sum() >= \
                    2 * kill_after_commits:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = FeatureStore.open(store).counts()
        assert partial["pending"] > 0, "the run finished before it could be killed; make the collection larger"

    finish = subprocess.run(precompute_command(collection, store), env=env, capture_output=True, text=True,
                            timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert FeatureStore.open(store).counts()["pending"] == 0
    assert_same_store(reference, store)
    assert not list(tmp_path.glob(".killed.zarr.creating-*")) or FeatureStore.exists(store)
