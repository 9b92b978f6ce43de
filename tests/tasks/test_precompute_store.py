"""Opening an existing store for a rerun: the same manifest continues, another listing or encoder is refused."""

import logging

import pandas as pd
import pytest

from model.encoders import EncoderConfig
from storage.store import FeatureStore, StoreError
from tasks.listing import Listing
from tasks.precompute import PrecomputeConfig, prepare_store


def listing(ids, manifest="collection/manifest.csv", max_duration=60.0) -> Listing:
    videos = pd.DataFrame({"video_id": ids, "source": [f"videos/{i}.mp4" for i in ids],
                           "caption": [f"caption of {i}" for i in ids], "duration_s": [30.0] * len(ids)})
    summary = {"manifest": manifest, "rows": len(ids), "kept": len(ids), "dropped": {},
               "min_duration_s": 20.0, "max_duration_s": max_duration, "probed": 0}
    return Listing(videos=videos, summary=summary)


CONFIG = PrecomputeConfig(encoder=EncoderConfig(preset="demo"), device="cpu")


def test_the_same_manifest_keeping_other_rows_today_continues_the_store_with_a_warning(tmp_path, caplog):
    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b", "c", "d"]), CONFIG)
    with caplog.at_level(logging.WARNING, logger="tasks.precompute"):
        store = prepare_store(path, listing(["a", "c", "d", "e"]), CONFIG)  # b not probed today, e probed now
    assert list(store.read_column("video_id")) == ["a", "b", "c", "d"]
    assert "keeps 1 the store does not have (e.g. ['e'])" in caplog.text and "drops 1 it has (e.g. ['b'])" in caplog.text


@pytest.mark.parametrize("other", [dict(manifest="elsewhere/manifest.csv"), dict(max_duration=90.0)])
def test_another_manifest_or_other_bounds_are_refused(tmp_path, other):
    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b", "c"]), CONFIG)
    with pytest.raises(StoreError, match="videos of another listing"):
        prepare_store(path, listing(["a", "b", "x"], **other), CONFIG)
    assert list(FeatureStore.open(path).read_column("video_id")) == ["a", "b", "c"]


def test_other_encoders_are_refused_even_with_the_same_rows(tmp_path):
    import zarr

    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b"]), CONFIG)
    group = zarr.open_group(path, mode="r+")
    group.attrs["dino"] = {**group.attrs["dino"], "id": "facebook/dinov2-small"}  # as a full-preset run made it
    with pytest.raises(StoreError, match="was encoded with dino 'facebook/dinov2-small', this run uses 'demo:"):
        prepare_store(path, listing(["a", "b"]), CONFIG)


def test_frames_of_another_size_are_refused_and_the_same_size_continues(tmp_path):
    """A rerun at another frame size would mix rows of two resolutions (and token counts) in one store."""
    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b"]), CONFIG)
    bigger = PrecomputeConfig(encoder=EncoderConfig(preset="demo", frame_size=224), device="cpu",
                              decode=CONFIG.decode.model_copy(update={"size": 224}))
    with pytest.raises(StoreError, match="holds frames of 256 px, this run encodes 224 px"):
        prepare_store(path, listing(["a", "b"]), bigger)
    assert prepare_store(path, listing(["a", "b"]), CONFIG).num_videos == 2  # the control: same size goes on


def test_a_download_that_keeps_failing_leaves_its_row_pending_for_the_next_run(tmp_path, caplog):
    """A 503 after the retries is not the video's fault: its row stays pending (not failed), the rest of its
    chunk is committed, and the next run, once the server is back, fills it."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from storage.store import OK, PENDING
    from tasks.decode import DecodeConfig
    from tasks.precompute import encode_chunks
    from tasks.samples import make_video

    www = tmp_path / "www"
    www.mkdir()
    make_video(www / "remote.mp4", 21, fps=2, size=(64, 48), seed=3)
    server_down = threading.Event()
    server_down.set()

    class Flaky(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            if server_down.is_set():
                self.send_error(503, "overloaded")
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Flaky, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/remote.mp4"
    for i in range(2):
        make_video(tmp_path / f"local{i}.mp4", 21, fps=2, size=(64, 48), seed=i)
    rows = listing(["local0", "local1", "remote"])
    rows.videos["source"] = [str(tmp_path / "local0.mp4"), str(tmp_path / "local1.mp4"), url]
    config = CONFIG.model_copy(update={"decode": DecodeConfig(workers=1), "download_dir": str(tmp_path / "dl")})
    path = str(tmp_path / "s.zarr")
    try:
        store = prepare_store(path, rows, config)
        with caplog.at_level(logging.WARNING, logger="tasks.precompute"):
            report = encode_chunks(path, store.pending_chunks(), config)
        store = FeatureStore.open(path)
        assert list(store.read_status()) == [OK, OK, PENDING] and store.failures() == []
        assert report.videos_ok == 2 and report.videos_failed == 0 and report.videos_deferred == 1
        assert "left for the next run: download failed" in caplog.text and "503" in caplog.text
        before = store.read_chunk(0).features[:2].copy()

        server_down.clear()
        report = encode_chunks(path, FeatureStore.open(path).pending_chunks(), config)
    finally:
        httpd.shutdown()
        httpd.server_close()
    store = FeatureStore.open(path)
    assert list(store.read_status()) == [OK, OK, OK] and report.videos_ok == 1
    assert (store.read_chunk(0).features[:2] == before).all()  # the rows done before are kept as they were


def test_an_encoder_output_with_infinities_is_a_failed_row_not_an_ok_one(tmp_path, monkeypatch):
    """Simulated half-precision overflow: the encoder returns inf for the frames of one video (the SD-VAE in
    float16 does this on some images). That row fails with the reason; the others of its batch are ok."""
    import numpy as np

    from model.encoders import FrameEncoder
    from storage.store import FAILED, OK
    from tasks.decode import DecodeConfig
    from tasks.precompute import NON_FINITE, encode_chunks
    from tasks.samples import make_video

    encode = FrameEncoder.encode

    def overflowing(self, frames):
        features, latents = encode(self, frames)
        latents[24:48] = np.inf  # the second video of the batch
        return features, latents

    monkeypatch.setattr(FrameEncoder, "encode", overflowing)
    for i in range(3):
        make_video(tmp_path / f"v{i}.mp4", 21, fps=2, size=(64, 48), seed=i)
    rows = listing(["v0", "v1", "v2"])
    rows.videos["source"] = [str(tmp_path / f"v{i}.mp4") for i in range(3)]
    config = CONFIG.model_copy(update={"decode": DecodeConfig(workers=1)})
    path = str(tmp_path / "s.zarr")
    report = encode_chunks(path, prepare_store(path, rows, config).pending_chunks(), config)
    store = FeatureStore.open(path)
    assert list(store.read_status()) == [OK, FAILED, OK] and report.videos_failed == 1
    assert store.failures()[0]["error"] == NON_FINITE
    assert np.isfinite(store.read_chunk(0).latents.astype(np.float32)).all()  # nothing non-finite on disk
