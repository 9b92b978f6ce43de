"""Sample videos: what make_video writes is what was asked, and the demo manifest matches its files."""

import re
import subprocess
import time

import decord
import imageio_ffmpeg
import numpy as np
import pandas as pd
import pytest

from tasks.samples import (
    DemoCollectionError, SampleVideoError, ensure_demo_collection, gradient_frame, iso_duration,
    make_demo_collection, make_video,
)

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def probe(path) -> dict:
    """What `ffmpeg -i` says about the first video stream: codec, coded size, duration, display rotation."""
    info = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    video = re.search(r"Stream #0:\d+.*?: Video: (\w+).*?, (\d+)x(\d+)", info)
    duration = re.search(r"Duration: (\d+):(\d+):([\d.]+)", info)
    rotation = re.search(r"rotation of (-?[\d.]+) degrees", info)
    h, m, s = (float(x) for x in duration.groups())
    return {
        "codec": video.group(1), "width": int(video.group(2)), "height": int(video.group(3)),
        "duration": 3600 * h + 60 * m + s, "rotation": float(rotation.group(1)) if rotation else None,
    }


def ffmpeg_frames(path, autorotate: bool = True) -> np.ndarray:
    """Every frame as ffmpeg decodes it, RGB: (N, H, W, 3) uint8."""
    cmd = [FFMPEG, "-v", "error"] + ([] if autorotate else ["-noautorotate"]) + ["-i", str(path)]
    info = probe(path)
    w, h = info["width"], info["height"]
    if autorotate and info["rotation"] is not None and round(info["rotation"]) % 180:
        w, h = h, w
    raw = subprocess.run(cmd + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


@pytest.mark.parametrize("suffix, codec", [(".mp4", "h264"), (".mov", "h264"), (".mkv", "h264"),
                                           (".webm", "vp9"), (".avi", "mjpeg")])
def test_make_video_has_the_asked_duration_size_and_codec(tmp_path, suffix, codec):
    path = make_video(tmp_path / f"clip{suffix}", duration_s=3, fps=10, size=(320, 240))
    info = probe(path)
    assert (info["codec"], info["width"], info["height"]) == (codec, 320, 240)
    assert info["duration"] == pytest.approx(3.0, abs=0.06)
    assert len(decord.VideoReader(str(path))) == 30


@pytest.mark.parametrize("name", ["odd.mp4", "odd.webm", "odd.avi", "odd.mkv"])
def test_odd_sizes_are_kept_exactly(tmp_path, name):
    path = make_video(tmp_path / name, duration_s=1, size=(321, 177), pattern="gradient")
    info = probe(path)
    assert (info["width"], info["height"]) == (321, 177)
    frames = ffmpeg_frames(path)
    expected = gradient_frame(321, 177)
    assert np.abs(frames[0, ..., :2].astype(int) - expected[..., :2]).mean() < 4  # red/green ramps where asked


def test_codec_can_be_chosen_over_the_suffix(tmp_path):
    assert probe(make_video(tmp_path / "vp8.webm", 1, codec="libvpx"))["codec"] == "vp8"


def test_rotated_video_stores_turned_frames_and_a_display_matrix(tmp_path):
    path = make_video(tmp_path / "phone.mp4", duration_s=1, size=(240, 320), pattern="gradient", rotate=90)
    info = probe(path)
    assert (info["width"], info["height"]) == (320, 240)  # coded landscape
    assert info["rotation"] == -90  # what a phone's rotate=90 tag reads as in ffmpeg
    upright = ffmpeg_frames(path)[0].astype(int)  # ffmpeg turns it by the matrix
    stored = ffmpeg_frames(path, autorotate=False)[0].astype(int)
    expected = gradient_frame(240, 320).astype(int)
    assert upright.shape == (320, 240, 3)
    assert np.abs(upright[..., :2] - expected[..., :2]).mean() < 4
    assert stored.shape == (240, 320, 3)
    assert np.abs(np.rot90(stored, -1)[..., :2] - expected[..., :2]).mean() < 4  # stored turned counter-clockwise


@pytest.mark.parametrize("kwargs, message", [
    ({"path": "x.avi", "rotate": 90}, "cannot carry rotation"),
    ({"path": "x.mp4", "rotate": 45}, "multiple of 90"),
    ({"path": "x.gif"}, "no default codec"),
    ({"path": "x.mp4", "pattern": "plaid"}, "unknown pattern"),
])
def test_bad_arguments_say_what_is_wrong(tmp_path, kwargs, message):
    kwargs = dict(kwargs, path=tmp_path / kwargs["path"])
    with pytest.raises(SampleVideoError, match=message):
        make_video(duration_s=1, **kwargs)


def test_gradient_blue_channel_encodes_the_frame_index(tmp_path):
    frames = ffmpeg_frames(make_video(tmp_path / "g.mp4", duration_s=2, fps=10, pattern="gradient"))
    blue = frames[:, 10:40, -40:-10, 2].mean(axis=(1, 2))  # away from the white marker
    np.testing.assert_allclose(blue, 255 * np.arange(20) / 19, atol=4)


def test_moving_object_moves_over_a_static_background(tmp_path):
    frames = ffmpeg_frames(make_video(tmp_path / "m.mp4", duration_s=4, fps=10, seed=3)).astype(int)
    changed = np.abs(frames[10] - frames[0]).max(axis=-1) > 60  # (H, W) pixels the object left or entered
    assert 0.002 < changed.mean() < 0.05  # a small object, not a changing background
    ys, xs = np.nonzero(np.abs(frames[0] - frames[20]).max(axis=-1) > 60)
    assert xs.size > 0
    other = ffmpeg_frames(make_video(tmp_path / "n.mp4", duration_s=1, fps=10, seed=4)).astype(int)
    assert np.abs(other[0] - frames[0]).mean() > 5  # another seed, another texture


def test_make_video_is_fast(tmp_path):
    started = time.perf_counter()
    make_video(tmp_path / "thirty.mp4", duration_s=30, fps=10, size=(320, 240))
    assert time.perf_counter() - started < 5  # about 0.5 s here; generous for a busy machine


def test_iso_duration_is_webvid_style():
    assert iso_duration(22) == "PT00H00M22S"
    assert iso_duration(83) == "PT00H01M23S"
    assert iso_duration(3725) == "PT01H02M05S"


def check_collection(manifest, n_videos):
    """The manifest's rows point at files whose real durations are the ones it states."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["videoid", "contentUrl", "duration", "name", "page_dir"]
    assert len(table) == n_videos
    assert (table["name"].str.strip() == "").sum() == 1
    assert table["videoid"].duplicated().sum() == 1
    seconds = []
    for row in table.drop_duplicates("contentUrl").itertuples():
        path = manifest.parent / row.contentUrl
        assert path.is_file() and not row.contentUrl.startswith("/")
        h, m, s = (int(x) for x in re.fullmatch(r"PT(\d\d)H(\d\d)M(\d\d)S", row.duration).groups())
        stated = 3600 * h + 60 * m + s
        assert probe(path)["duration"] == pytest.approx(stated, abs=0.25), row.contentUrl
        seconds.append(stated)
    seconds = np.array(seconds)
    return table, seconds


def test_small_demo_collection_matches_its_files(tmp_path):
    manifest = make_demo_collection(tmp_path / "demo", n_videos=8, seed=1)
    table, seconds = check_collection(manifest, 8)
    assert (seconds < 20).sum() >= 1 and (seconds > 60).sum() >= 1 and ((seconds >= 20) & (seconds <= 60)).sum() >= 4
    rotated = probe(manifest.parent / table.loc[2, "contentUrl"])
    assert rotated["rotation"] == -90  # stored turned, with a display matrix (its border's stripes turn with it)
    assert "border of" in table.loc[0, "name"] and "patch had a moment before" in table.loc[0, "name"]


def test_a_demo_folder_is_reused_only_for_the_same_collection(tmp_path):
    folder = tmp_path / "demo" / "videos"
    manifest = ensure_demo_collection(folder, 4, seed=2, control="none")
    made = manifest.stat().st_mtime_ns
    assert ensure_demo_collection(folder, 4, seed=2, control="none").stat().st_mtime_ns == made  # kept as it is
    assert "no patch had" in pd.read_csv(manifest)["name"][0]
    with pytest.raises(DemoCollectionError, match="holds another demo collection .*'control': 'none'.* not "
                                                  ".*'control': 'cue'.*use another --workdir"):
        ensure_demo_collection(folder, 4, seed=2, control="cue")


@pytest.mark.slow
def test_full_demo_collection_matches_its_files_and_is_quick_to_make(tmp_path):
    started = time.perf_counter()
    manifest = make_demo_collection(tmp_path / "demo", n_videos=32, seed=0)
    elapsed = time.perf_counter() - started
    table, seconds = check_collection(manifest, 32)
    assert (seconds < 20).sum() >= 3 and (seconds > 60).sum() >= 3
    assert ((seconds >= 20) & (seconds <= 60)).sum() >= 24
    assert {p.rsplit(".", 1)[1] for p in table["contentUrl"]} == {"mp4", "mkv", "webm"}
    assert elapsed < 40  # about 6 s here
