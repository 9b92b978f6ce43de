"""Decoding: right frames, upright, 256 x 256, clear reasons for bad files; the pool survives hangs and crashes."""

import os
import signal
import subprocess
import sys
import time
import types

import decord
import imageio_ffmpeg
import numpy as np
import pytest

from tasks.decode import (
    DecodeConfig, DecodeError, DecodePool, DecodePoolError, decode_clip, describe_decord_error, open_reader,
    read_clip, sample_indices, timestamps_reliable, window_indices,
)
from tasks.samples import make_video

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
LONG_ENOUGH = ["moviepy_big_buck_bunny_0_30.webm", "torchcodec_nasa_13013.mp4", "decord_flipping_a_pancake.mkv"]
THREE_FRAMES = ["decord_video_90.mov", "nwbwidgets_stub_mjpeg.avi"]


def ffmpeg_reference(path, index: int, width: int, height: int, size: int = 256) -> np.ndarray:
    """Frame `index` as ffmpeg shows it (autorotated), scaled to width x height and centre-cropped: (S, S, 3)."""
    vf = f"select=eq(n\\,{index}),scale={width}:{height}:flags=bicubic,crop={size}:{size}"
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-vf", vf, "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(size, size, 3)


def blue_levels(clip: np.ndarray) -> np.ndarray:
    """Blue of a `gradient` clip away from its marker: 255 * i / (n - 1) for source frame i. (T,)"""
    return clip[:, 200:240, 200:240, 2].astype(float).mean(axis=(1, 2))


def expected_blue(count: int, frames: int = 24, window: int | None = 72) -> np.ndarray:
    """Blue of the kept frames of a `count`-frame gradient clip: the window's floor(linspace), or spread."""
    kept = sample_indices(count, frames) if window is None else window_indices(min(count, window), frames)
    return 255 * kept / (count - 1)


def mean_abs(a, b) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


# ---- indices -------------------------------------------------------------------------------------------


def test_window_indices_are_the_seeds_floor_of_linspace():
    assert window_indices(72, 24).tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 37, 40, 43, 46, 49, 52,
                                               55, 58, 61, 64, 67, 71]  # np.linspace(0, 71, 24).astype(int)
    assert window_indices(24, 24).tolist() == list(range(24))
    with pytest.raises(ValueError):
        window_indices(23, 24)


def test_sample_indices_are_even_rounded_and_clamped():
    assert sample_indices(720, 24)[[0, -1]].tolist() == [0, 719]
    assert np.all(np.diff(sample_indices(720, 24)) >= 31)  # even spacing: 719 / 23 = 31.3
    assert sample_indices(3, 24).tolist() == [0] * 6 + [1] * 12 + [2] * 6  # repeats when fewer frames
    assert sample_indices(1, 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        sample_indices(0, 24)


def test_decord_messages_are_shortened():
    err = decord.DECORDError(
        "[18:07:36] /project/src/video/ffmpeg/threaded_decoder.cc:292: [18:07:36] /project/src/video/ffmpeg/"
        "threaded_decoder.cc:218: Check failed: avcodec_send_packet(dec_ctx_.get(), pkt.get()) >= 0 "
        "(-1094995529 vs. 0) Thread worker: Error sending packet.")
    assert describe_decord_error(err) == ("Thread worker: Error sending packet "
                                          "(ffmpeg: invalid data found when processing input)")


# ---- the shared real videos ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [72, None])
@pytest.mark.parametrize("name", LONG_ENOUGH)
def test_every_readable_shared_video_decodes_to_256_squares(shared_videos, name, window):
    clip = decode_clip(shared_videos / name, window=window)
    assert clip.shape == (24, 256, 256, 3) and clip.dtype == np.uint8
    assert clip.std() > 10  # real picture content, not a blank frame
    assert len({frame.tobytes() for frame in clip}) >= 20  # distinct frames


@pytest.mark.parametrize("name, fps", [
    ("moviepy_big_buck_bunny_0_30.webm", 24.0), ("decord_flipping_a_pancake.mkv", 30.0),
    ("torchcodec_nasa_13013.mp4", 30000 / 1001),  # decord's stream of it is #3, 29.97 fps
])
def test_the_window_keeps_frames_a_tenth_of_a_second_apart(shared_videos, name, fps):
    """The seed's window: every third of the first 72 frames, so 71 / 23 frame periods apart on average; spread over
    the whole video they are seconds apart on long videos."""
    window, spread = read_clip(shared_videos / name), read_clip(shared_videos / name, window=None)
    assert window.interval_s == pytest.approx(71 / 23 / fps, rel=0.02)
    assert spread.interval_s > window.interval_s
    np.testing.assert_array_equal(window.frames[0], spread.frames[0])  # both start at the first frame


def test_the_window_is_the_same_in_a_copy_of_only_the_first_80_frames(shared_videos, tmp_path):
    """Nothing after the window matters: a losslessly re-encoded copy of the first 80 frames decodes to the same
    frames; spread over the whole (shorter) copy they differ."""
    source = shared_videos / "moviepy_big_buck_bunny_0_30.webm"
    head = tmp_path / "head.mkv"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(source), "-frames:v", "80", "-c:v", "ffv1", "-an", str(head)],
                   check=True)
    np.testing.assert_array_equal(decode_clip(head), decode_clip(source))
    assert mean_abs(decode_clip(head, window=None), decode_clip(source, window=None)) > 5


@pytest.mark.parametrize("name", THREE_FRAMES)
def test_videos_shorter_than_24_frames_are_refused_by_the_window(shared_videos, name):
    with pytest.raises(DecodeError, match=r"^only 3 frames of the video decode, fewer than the 24 a row keeps$"):
        decode_clip(shared_videos / name)


def test_corrupt_video_fails_with_the_frame_that_breaks(shared_videos):
    with pytest.raises(DecodeError, match=r"frame 28 of 50 cannot be decoded: .*invalid data"):
        decode_clip(shared_videos / "decord_corrupted.mp4")


def test_video_without_duration_fails_with_broken_metadata(shared_videos):
    with pytest.raises(DecodeError, match=r"cannot open: the container has no duration or frame count"):
        decode_clip(shared_videos / "moviepy_no_duration.webm")


@pytest.mark.parametrize("name", THREE_FRAMES)
def test_three_frame_videos_repeat_their_frames_when_spread(shared_videos, name):
    clip = decode_clip(shared_videos / name, window=None)
    groups = [clip[sample_indices(3, 24) == i] for i in range(3)]  # 6, 12 and 6 copies of frames 0, 1, 2
    for group in groups:
        assert all(np.array_equal(group[0], other) for other in group)
    assert not np.array_equal(groups[0][0], groups[2][0])


def test_phone_rotated_shared_video_comes_out_upright(shared_videos):
    path = shared_videos / "decord_video_90.mov"  # coded 568x320, display matrix -90: portrait 320x568
    clip = decode_clip(path, window=None)  # 3 frames: only the spread keeps it
    upright = ffmpeg_reference(path, 0, 256, 454)  # ffmpeg autorotates, then short side 256
    assert mean_abs(clip[0], upright) < 2
    for turns in (1, 2, 3):
        assert mean_abs(clip[0], np.rot90(upright, turns)) > 15


# ---- generated videos ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_generated_rotated_videos_come_out_upright(tmp_path, rotate):
    path = make_video(tmp_path / f"r{rotate}.mp4", duration_s=3, fps=10, size=(240, 320), pattern="gradient",
                      rotate=rotate)
    plain = make_video(tmp_path / "plain.mp4", duration_s=3, fps=10, size=(240, 320), pattern="gradient")
    clip, reference = decode_clip(path), decode_clip(plain)
    assert mean_abs(clip, reference) < 3
    assert mean_abs(clip[0], ffmpeg_reference(path, 0, 256, 341)) < 2
    for turns in (1, 2, 3):
        assert mean_abs(clip[0], np.rot90(reference[0], turns)) > 30


@pytest.mark.parametrize("name, codec", [
    ("h264.mp4", None), ("vp9.webm", None), ("vp8.webm", "libvpx"), ("h264.mkv", None), ("mjpeg.avi", None),
    ("h264.mov", None), ("mpeg4.avi", "mpeg4"),
])
def test_containers_and_codecs_give_the_evenly_spaced_frames(tmp_path, name, codec):
    path = make_video(tmp_path / name, duration_s=9, fps=10, size=(320, 240), pattern="gradient", codec=codec)
    clip = read_clip(path)
    assert clip.frames.shape == (24, 256, 256, 3)
    np.testing.assert_allclose(blue_levels(clip.frames), expected_blue(90), atol=5)  # the first 72 of 90 frames
    assert clip.interval_s == pytest.approx(71 / 23 / 10, rel=0.01)
    np.testing.assert_allclose(blue_levels(decode_clip(path, window=None)), expected_blue(90, window=None), atol=5)
    first = clip.frames[0]
    assert first[128, 10, 0] < first[128, 245, 0] and first[10, 128, 1] < first[245, 128, 1]  # not flipped


@pytest.mark.parametrize("seconds", [5, 30, 75])
def test_the_window_is_the_start_of_short_medium_and_long_videos(tmp_path, seconds):
    """The first min(72, n) frames whatever the length; spread, the kept frames span the whole video."""
    path = make_video(tmp_path / f"{seconds}s.mp4", duration_s=seconds, fps=10, size=(160, 120), pattern="gradient")
    np.testing.assert_allclose(blue_levels(decode_clip(path)), expected_blue(10 * seconds), atol=5)
    np.testing.assert_allclose(blue_levels(decode_clip(path, window=None)), expected_blue(10 * seconds, window=None),
                               atol=5)


def test_a_longer_window_is_a_longer_span(tmp_path):
    path = make_video(tmp_path / "v.mp4", duration_s=30, fps=10, size=(160, 120), pattern="gradient")
    clip = read_clip(path, window=240)
    np.testing.assert_allclose(blue_levels(clip.frames), expected_blue(300, window=240), atol=5)
    assert clip.interval_s == pytest.approx(239 / 23 / 10, rel=0.01)


@pytest.mark.parametrize("size", [(321, 177), (177, 321), (240, 426), (256, 256), (96, 64)])
def test_portrait_odd_and_small_sizes_become_centre_crops(tmp_path, size):
    path = make_video(tmp_path / "v.mkv", duration_s=3, fps=10, size=size, pattern="gradient")
    clip = decode_clip(path)
    assert clip.shape == (24, 256, 256, 3)
    w, h = size
    short = min(w, h)
    # the crop keeps the middle: red at the centre column is the middle of the ramp, whatever the aspect
    assert int(clip[0, 128, 128, 0]) == pytest.approx(127, abs=12)
    # along the long side only the middle short/long part survives, along the short side the full ramp
    red_span = int(clip[0, 128, 250, 0]) - int(clip[0, 128, 5, 0])
    green_span = int(clip[0, 250, 128, 1]) - int(clip[0, 5, 128, 1])
    assert red_span == pytest.approx(255 * short / w, abs=20)
    assert green_span == pytest.approx(255 * short / h, abs=20)


def test_cut_off_download_drops_only_its_undecodable_tail(tmp_path):
    full = make_video(tmp_path / "g.mp4", duration_s=10, fps=10, pattern="gradient")
    faststart = tmp_path / "fast.mp4"  # index first, as web videos are, so a cut-off file still opens
    subprocess.run([FFMPEG, "-v", "error", "-i", str(full), "-c", "copy", "-movflags", "+faststart",
                    str(faststart)], check=True)
    data = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.97)])
    reader = decord.VideoReader(str(cut))
    with pytest.raises(decord.DECORDError):
        reader.get_batch([len(reader) - 1])  # decord counts frames it cannot decode
    clip = decode_clip(cut, window=None)
    blue = blue_levels(clip)
    assert np.all(np.diff(blue) > 0) and 220 < blue[-1] < 250  # evenly spread up to the last frame that decodes
    # The window (the first 72 of 100 frames) never reaches the broken tail: the same frames as the whole file.
    np.testing.assert_array_equal(decode_clip(cut), decode_clip(full))


def test_a_cut_off_file_shorter_than_the_window_drops_its_tail(tmp_path):
    full = make_video(tmp_path / "g.mp4", duration_s=5, fps=10, pattern="gradient")
    faststart = tmp_path / "fast.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-i", str(full), "-c", "copy", "-movflags", "+faststart",
                    str(faststart)], check=True)
    data = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.97)])
    blue = blue_levels(decode_clip(cut))  # the window reaches the end of this 50-frame file: its tail is dropped
    assert np.all(np.diff(blue) > 0) and 220 < blue[-1] < 250


def test_avi_without_timestamps_is_read_in_order(tmp_path):
    source = make_video(tmp_path / "g.mp4", duration_s=5, fps=10, pattern="gradient")
    avi = tmp_path / "bframes.avi"  # MPEG-4 ASP with B-frames in AVI: packets without timestamps
    subprocess.run([FFMPEG, "-v", "error", "-i", str(source), "-c:v", "mpeg4", "-bf", "2", "-q:v", "3", str(avi)],
                   check=True)
    assert not timestamps_reliable(open_reader(str(avi), 1))  # decord's seeking would return wrong frames here
    clip = read_clip(avi)
    np.testing.assert_allclose(blue_levels(clip.frames), expected_blue(50), atol=5)
    assert clip.interval_s == pytest.approx(49 / 23 / 10, rel=0.01)  # from the frame rate: no usable timestamps
    np.testing.assert_allclose(blue_levels(decode_clip(avi, window=None)), expected_blue(50, window=None), atol=5)


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"), (b"", "empty"), (b"not a video at all", "reads no video"),
])
def test_unreadable_files_say_why(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DecodeError, match=f"cannot open: .*{reason}"):
        decode_clip(path)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "sound.m4a"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(path)], check=True)
    with pytest.raises(DecodeError, match="no video stream"):
        decode_clip(path)


# ---- the pool ------------------------------------------------------------------------------------------
# Decode functions for the workers: module level, so that a spawned worker can import them by name.


def fake_decode(path, frames=24, size=256, num_threads=1, window=None):
    """Hangs on 'hang' paths, segfaults on 'crash', raises on 'raise'; else a clip filled with the path's number."""
    name = os.path.splitext(os.path.basename(path))[0]
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("raise"):
        raise ValueError("something odd")
    if name.startswith("bad"):
        raise DecodeError("cannot open: no such file")
    return np.full((frames, size, size, 3), int(name.split("-")[1]), np.uint8)


def worker_pid(path, frames=24, size=256, num_threads=1, window=None):
    return np.array([os.getpid()], np.int64)


def test_pool_returns_real_decodes_by_key(tmp_path):
    paths = [make_video(tmp_path / f"v{i}.mp4", duration_s=3, fps=10, pattern="gradient", seed=i) for i in range(3)]
    with DecodePool(DecodeConfig(workers=2, timeout_s=60)) as pool:
        for i, path in enumerate(paths):
            pool.submit(f"row{i}", str(path))
        pool.submit("missing", str(tmp_path / "nope.mp4"))
        results = [pool.get(f"row{i}") for i in range(3)]
        missing = pool.get("missing")
    for i, result in enumerate(results):
        assert result.key == f"row{i}" and result.error is None and result.seconds > 0
        assert np.array_equal(result.frames, decode_clip(paths[i]))
        assert result.interval_s == pytest.approx(29 / 23 / 10, rel=0.01)
    assert missing.frames is None and "no such file" in missing.error


def test_pool_keeps_order_of_many_jobs_and_rejects_unknown_keys():
    with DecodePool(DecodeConfig(workers=2, frames=2, size=8), decode_fn=fake_decode) as pool:
        for i in range(20):
            pool.submit(f"k{i}", f"/videos/ok-{i}.mp4")
        with pytest.raises(ValueError, match="submitted already"):
            pool.submit("k3", "/videos/ok-3.mp4")
        values = [int(pool.get(f"k{i}").frames[0, 0, 0, 0]) for i in range(20)]
        with pytest.raises(KeyError):
            pool.get("k0")  # collected already
    assert values == list(range(20))


def test_pool_kills_a_hung_worker_and_goes_on(tmp_path):
    config = DecodeConfig(workers=1, frames=2, size=8, timeout_s=1.5)
    with DecodePool(config, decode_fn=fake_decode) as pool:
        pool.submit("hung", "/videos/hang-0.mp4")
        pool.submit("next", "/videos/ok-7.mp4")
        pool.submit("after", "/videos/ok-8.mp4")
        started = time.perf_counter()
        hung = pool.get("hung")
        waited = time.perf_counter() - started
        after_hang = [pool.get("next"), pool.get("after")]
    assert hung.frames is None and hung.error == "decode timed out after 1.5 s"
    assert 1.4 < waited < 10 and hung.seconds >= 1.5
    assert [int(r.frames.max()) for r in after_hang] == [7, 8]


def test_pool_turns_a_crash_into_an_error_and_replaces_the_worker():
    config = DecodeConfig(workers=1, frames=2, size=8, timeout_s=30)
    with DecodePool(config, decode_fn=fake_decode) as pool:
        for key, path in [("a", "ok-1"), ("crash", "crash-0"), ("raise", "raise-0"), ("bad", "bad-0"), ("b", "ok-2")]:
            pool.submit(key, f"/videos/{path}.mp4")
        results = {key: pool.get(key) for key in ["a", "crash", "raise", "bad", "b"]}
    assert results["crash"].error == "decoder process died (signal 11, SIGSEGV)"
    assert results["raise"].error == "unexpected ValueError: something odd"
    assert results["bad"].error == "cannot open: no such file"
    assert int(results["a"].frames.max()) == 1 and int(results["b"].frames.max()) == 2


def test_pool_replaces_a_killed_worker_with_a_new_process():
    with DecodePool(DecodeConfig(workers=1, timeout_s=1.0), decode_fn=worker_pid) as pool:
        pool.submit("before", "x")
        first = int(pool.get("before").frames[0])
        os.kill(first, signal.SIGKILL)  # dies while idle: replaced, no job lost
        time.sleep(0.2)
        pool.submit("after", "y")
        second = int(pool.get("after").frames[0])
    assert first != second


def test_pool_fails_loudly_when_workers_cannot_start(monkeypatch):
    phantom = types.ModuleType("phantom_decoders")  # exists in this process only: spawned workers cannot import it
    exec("def decode(path, frames=24, size=256, num_threads=1, window=None):\n    return None", phantom.__dict__)
    monkeypatch.setitem(sys.modules, "phantom_decoders", phantom)
    with DecodePool(DecodeConfig(workers=1), decode_fn=phantom.decode) as pool:
        pool.submit("a", "x.mp4")
        with pytest.raises(DecodePoolError, match="exit while starting .*phantom_decoders.decode"):
            pool.get("a")
