"""The seed's frame window through the whole precompute: what a store built with defaults keeps, and records."""

import subprocess

import imageio_ffmpeg
import numpy as np
import pandas as pd
import pytest

from flows.cli import format_store_info
from model.encoders import EncoderConfig
from storage.store import OK, FeatureStore, StoreError
from tasks.decode import DecodeConfig
from tasks.listing import ListingConfig, list_videos
from tasks.precompute import PrecomputeConfig, encode_chunks, precompute_table, prepare_store

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
BUNNY = "moviepy_big_buck_bunny_0_30.webm"  # 720 frames, 24 fps


def build_store(manifest, path, decode: DecodeConfig = DecodeConfig(workers=1)) -> FeatureStore:
    config = PrecomputeConfig(encoder=EncoderConfig(preset="demo"), decode=decode, device="cpu")
    listing = list_videos(manifest, ListingConfig(min_duration_s=1))
    store = prepare_store(str(path), listing, config)
    encode_chunks(str(path), store.pending_chunks(), config)
    return FeatureStore.open(path)


@pytest.fixture(scope="module")
def bunny_and_its_head(shared_videos, tmp_path_factory):
    """A manifest of the real 30 s video and a lossless copy (FFV1) of only its first 80 frames."""
    folder = tmp_path_factory.mktemp("window")
    head = folder / "head.mkv"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(shared_videos / BUNNY), "-frames:v", "80", "-c:v", "ffv1",
                    "-an", str(head)], check=True)
    manifest = folder / "manifest.csv"
    pd.DataFrame({"video_id": ["whole", "head"], "path": [str(shared_videos / BUNNY), str(head)],
                  "duration": [30.0, 80 / 24], "caption": ["big buck bunny", "its first 80 frames"]}
                 ).to_csv(manifest, index=False)
    return manifest


@pytest.mark.slow
def test_a_default_store_keeps_the_seeds_window_so_a_copy_of_the_first_80_frames_matches(bunny_and_its_head,
                                                                                       tmp_path):
    store = build_store(bunny_and_its_head, tmp_path / "window.zarr")
    assert store.attrs["sampling"]["mode"] == "window" and store.attrs["sampling"]["window_frames"] == 72
    assert store.read_status().tolist() == [OK, OK]
    rows = store.read_chunk(0)
    np.testing.assert_array_equal(rows.features[0], rows.features[1])  # nothing after frame 72 was used
    np.testing.assert_array_equal(rows.latents[0], rows.latents[1])
    np.testing.assert_allclose(rows.frame_interval_s, 71 / 23 / 24, rtol=0.01)  # every third frame at 24 fps

    info = store.info()
    assert info["frame_interval"]["median_s"] == pytest.approx(0.1286, abs=1e-3) and info["frame_interval"]["rows"] == 2
    assert "24 of the first 72 frames, median 0.129 s apart (2 rows)" in format_store_info(info)
    table = {row["metric"]: row["value"] for row in precompute_table(info, [])}
    assert table["median seconds between stored frames"] == pytest.approx(0.1286, abs=1e-3)
    assert table["frames kept"] == "24 of the first 72 frames"


@pytest.mark.slow
def test_spread_over_the_whole_video_the_two_copies_differ(bunny_and_its_head, tmp_path):
    """The negative control of the test above: the old spread sees the 30 s video and its 3.3 s head differently."""
    store = build_store(bunny_and_its_head, tmp_path / "spread.zarr", DecodeConfig(workers=1, sampling="spread"))
    rows = store.read_chunk(0)
    assert store.attrs["sampling"]["mode"] == "spread"
    assert np.abs(rows.features[0].astype(np.float32) - rows.features[1].astype(np.float32)).mean() > 0.01
    assert rows.frame_interval_s[0] == pytest.approx(719 / 23 / 24, rel=0.01)  # 1.3 s apart


def test_a_rerun_with_another_window_is_refused_naming_both(tmp_path):
    from tests.tasks.test_precompute_store import listing

    path = str(tmp_path / "s.zarr")
    default = PrecomputeConfig(encoder=EncoderConfig(preset="demo"), device="cpu")
    prepare_store(path, listing(["a", "b"]), default)
    for decode, asked in [(DecodeConfig(sampling="spread"), "24 frames spread over the whole video"),
                          (DecodeConfig(window_frames=96), "24 of the first 96 frames")]:
        with pytest.raises(StoreError, match=f"keeps 24 of the first 72 frames of each video, this run asks for "
                                             f"{asked}; .* --sampling window --window-frames 72"):
            prepare_store(path, listing(["a", "b"]), default.model_copy(update={"decode": decode}))
    prepare_store(path, listing(["a", "b"]), default)  # the same window continues


def test_a_window_shorter_than_the_frames_kept_is_refused():
    with pytest.raises(ValueError, match=r"window_frames \(20\) must be at least frames \(24\)"):
        DecodeConfig(window_frames=20)
    assert DecodeConfig(window_frames=20, sampling="spread").window is None


def test_stores_of_schema_1_are_refused_with_what_changed(tmp_path):
    import zarr

    from tests.tasks.test_precompute_store import listing

    path = str(tmp_path / "old.zarr")
    prepare_store(path, listing(["a", "b"]), PrecomputeConfig(encoder=EncoderConfig(preset="demo"), device="cpu"))
    zarr.open_group(path, mode="r+").attrs["schema_version"] = 1
    with pytest.raises(StoreError, match="has store schema 1; this code reads schema 2 .*72-frame window"):
        FeatureStore.open(path)
