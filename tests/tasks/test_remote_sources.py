"""s3:// sources against a real S3 API server (moto, tests/s3_server.py): listing, probing, fetching, and the
credentials staying out of every log line, error and stored failure."""

import logging
import socket

import numpy as np
import pandas as pd
import pytest
import s3fs

from tasks.download import PermanentDownloadError, TransientDownloadError, cached_name, fetch
from tasks.listing import DROP_REASONS, ListingConfig, list_videos
from tasks.samples import make_video
from tests.s3_server import TEST_SECRET_KEY


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    """The bytes of a real 21 s video (64x48, 10 fps)."""
    return make_video(tmp_path_factory.mktemp("s3clip") / "clip.mp4", duration_s=21, size=(64, 48)).read_bytes()


@pytest.fixture
def bucket(s3_env, clip):
    """A fresh bucket holding clips/clip.mp4; no s3fs client is cached across tests (each test's environment)."""
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{s3_env.removeprefix('s3://')}/clips/clip.mp4", clip)
    yield s3_env
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def all_logs(caplog):
    """Every log record of every library, DEBUG included (botocore's and s3fs' too)."""
    caplog.set_level(logging.DEBUG)
    return caplog


def _retries(caplog) -> list[str]:
    """The retry lines fetch logged."""
    return [r.getMessage() for r in caplog.records if r.name == "tasks.download" and "; retry " in r.getMessage()]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_listing_keeps_s3_sources_and_probes_their_missing_durations(bucket, clip, tmp_path, all_logs):
    rows = [
        {"path": f"{bucket}/clips/clip.mp4", "caption": "downloaded, then probed"},
        {"path": f"{bucket}/clips/gone.mp4", "caption": "no such key: download_failed"},
        {"path": f"{bucket}/clips/given.mp4", "caption": "duration given: never downloaded", "duration": 30},
        {"path": "nosuchproto://host/a.mp4", "caption": "unknown protocol", "duration": 30},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    downloads = tmp_path / "downloads"
    config = ListingConfig(download_dir=str(downloads), download_attempts=2)
    listing = list_videos(tmp_path / "m.csv", config)

    assert listing.videos["source"].tolist() == [f"{bucket}/clips/clip.mp4", f"{bucket}/clips/given.mp4"]
    assert listing.videos["video_id"].tolist() == ["clip", "given"]
    np.testing.assert_allclose(listing.videos["duration_s"], [21.0, 30.0], atol=0.1)
    expected = dict.fromkeys(DROP_REASONS, 0) | {"download_failed": 1, "unsupported_source": 1}
    assert listing.summary["dropped"] == expected and listing.summary["probed"] == 2
    # The probed file stays in the cache for decoding, under the name fetch gives it.
    assert [p.name for p in downloads.iterdir()] == [cached_name(f"{bucket}/clips/clip.mp4")]
    assert (downloads / cached_name(f"{bucket}/clips/clip.mp4")).read_bytes() == clip
    assert f"download of {bucket}/clips/gone.mp4 failed: not found" in all_logs.text
    assert _retries(all_logs) == []  # a missing key is permanent: no second attempt
    assert TEST_SECRET_KEY not in all_logs.text


def test_fetch_downloads_an_s3_object_into_the_cache(bucket, clip, tmp_path):
    url = f"{bucket}/clips/clip.mp4"
    path = fetch(url, tmp_path, attempts=3)
    assert path == tmp_path / cached_name(url) and path.suffix == ".mp4"
    assert path.read_bytes() == clip
    s3fs.S3FileSystem(skip_instance_cache=True).rm(url)
    assert fetch(url, tmp_path) == path  # cached: no request, so the deleted object does not matter
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no .part file left behind


def test_a_missing_key_or_bucket_is_a_permanent_failure_with_a_clear_reason(bucket, tmp_path, all_logs):
    errors = []
    for url in (f"{bucket}/clips/gone.mp4", "s3://fvlm-no-such-bucket/clip.mp4"):
        with pytest.raises(PermanentDownloadError, match=rf"download of {url} failed: not found \(") as error:
            fetch(url, tmp_path, attempts=3, backoff_s=0.01)
        errors.append(str(error.value))
        assert error.value.__cause__ is None and error.value.__suppress_context__
    with pytest.raises(PermanentDownloadError, match="failed: ValueError"):
        fetch(bucket, tmp_path, attempts=3, backoff_s=0.01)  # a bucket is no object
    assert _retries(all_logs) == []
    assert not any(tmp_path.iterdir())
    assert TEST_SECRET_KEY not in all_logs.text + "".join(errors)


def test_an_unreachable_endpoint_is_transient_and_retried(bucket, tmp_path, monkeypatch, all_logs):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    url = f"{bucket}/clips/clip.mp4"
    with pytest.raises(TransientDownloadError, match=r"EndpointConnectionError.*gave up after 2 attempts") as error:
        fetch(url, tmp_path, timeout_s=2.0, attempts=2, backoff_s=0.01)
    assert f"download of {url} failed" in str(error.value)
    assert len(_retries(all_logs)) == 1 and "retry 1 of 1" in _retries(all_logs)[0]
    assert not any(tmp_path.iterdir())
    assert TEST_SECRET_KEY not in all_logs.text + str(error.value)


def test_secret_environment_values_are_blanked_out_of_errors(bucket, tmp_path, monkeypatch):
    # A secret in a key name is contrived, but it reaches both the URL and the back end's message.
    monkeypatch.setenv("FVLM_TEST_API_TOKEN", "tok-0123456789")
    with pytest.raises(PermanentDownloadError) as error:
        fetch(f"{bucket}/tok-0123456789/{TEST_SECRET_KEY}.mp4", tmp_path)
    assert str(error.value) == (f"download of {bucket}/***/***.mp4 failed: not found "
                                f"(FileNotFoundError: {bucket.removeprefix('s3://')}/***/***.mp4)")


@pytest.mark.slow
def test_precompute_encodes_an_s3_source_and_fails_a_missing_key(bucket, tmp_path, all_logs):
    """Listing -> store -> ChunkPipeline with the demo encoders: the s3 video is fetched and encoded, the missing
    key becomes a failed row whose stored reason says so, and no credential reaches the store."""
    from model.encoders import EncoderConfig
    from storage.store import FeatureStore, StoreConfig
    from tasks import precompute
    from tasks.decode import DecodeConfig

    rows = [{"videoid": "s3_ok", "contentUrl": f"{bucket}/clips/clip.mp4", "duration": 21, "name": "on s3"},
            {"videoid": "s3_gone", "contentUrl": f"{bucket}/clips/gone.mp4", "duration": 21, "name": "no such key"}]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    listing = list_videos(tmp_path / "manifest.csv")
    config = precompute.PrecomputeConfig(
        encoder=EncoderConfig(preset="demo"), decode=DecodeConfig(workers=1), layout=StoreConfig(chunk_videos=2),
        device="cpu", download_dir=str(tmp_path / "downloads"),
    )
    store_path = str(tmp_path / "store")
    store = precompute.prepare_store(store_path, listing, config)
    report = precompute.encode_chunks(store_path, store.pending_chunks(), config)

    store = FeatureStore.open(store_path)
    assert report.videos_ok == 1 and report.videos_failed == 1
    failures = {f["video_id"]: f["error"] for f in store.failures()}
    assert list(failures) == ["s3_gone"]
    assert failures["s3_gone"].startswith(f"download failed: download of {bucket}/clips/gone.mp4 failed: not found")
    assert TEST_SECRET_KEY not in all_logs.text + repr(failures) + repr(report.as_dict())
