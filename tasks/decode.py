"""Decode clips with decord: 24 frames per video, short side to 256, centre crop 256 x 256.

Which frames: by default the seed's window (`precompute_dino.py` runs `ffmpeg -frames:v 72` and keeps 24 of those
72 frames at `floor(linspace(0, n - 1, 24))`): the first `window` frames the file really has are decoded, the rest
of the file never is, and 24 of them are kept, every third frame of a normal video, about 0.1 s apart. Spreading
the 24 frames over the whole video (`window=None`) is another experiment (frames seconds apart, across scene
cuts) and only an explicit option.

`read_clip` decodes one file in this process (`decode_clip`: its frames alone). `DecodePool` runs it in worker
processes (a `tasks.workers.WorkerPool`), because decord can hang forever in native code holding the GIL (decord
issue 373) or crash the process: the parent measures a timeout per video, kills (SIGKILL) and replaces a worker
that overruns it or dies, and turns that video into an error result, so a bad file never stops a batch.

What decord (the `decord2` build) does, measured with decord2 3.4 and ffmpeg 8/9 files:
- Stream: ffmpeg's "best" video stream (`av_find_best_stream`), which is not always stream #0: for a file with
  two video streams it takes the larger one (torchcodec's nasa_13013.mp4: #3, 480x270, not #0, 320x180). We
  keep that choice.
- Frame count: `len(reader)` is the number of video packets it indexed. Packets that do not decode (the tail
  of a truncated download: H.264 with B-frames loses its last 2-3 frames) make it overstate; when frames at
  the end fail we sample from a smaller count (at most `max_tail_loss` of the frames dropped); a failure
  earlier than that is a corrupt file and an error. Opening a reader indexes the packets of the whole file
  (demuxing, no decoding); the window's frames are then decoded from the first keyframe on, and decoding stops
  at the last kept frame: 0.27 s instead of 1.3 s for the 30 s 1280x720 VP8 sample, 0.12 s instead of 0.69 s
  for a 50 s 596x336 H.264 clip (one thread).
- Time: the spacing of the kept frames in seconds comes from the packets' timestamps (variable frame rate
  included), or from the average frame rate when the timestamps are unusable.
- Seeking goes through packet timestamps. When packets have none (AVI with B-frames, e.g. Xvid/DivX),
  random access returns wrong frames (seen: frame 0 again in place of frame 10), so such files are read
  sequentially, which is correct, and slower.
- Rotation: display-matrix rotation by 90/180/270 (phone videos) is applied by decord itself, identical to
  ffmpeg's autorotate; width/height passed to the reader are those of the upright picture.
- Resize: VideoReader(width=, height=) scales in the decoder with swscale's default bicubic, identical to
  `ffmpeg -vf scale=W:H` (and about 1/255 mean abs diff from PIL bicubic), so we let it do the work.
  Non-square pixels (sample aspect ratio) are not corrected.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import decord
import numpy as np
from pydantic import BaseModel, Field, model_validator

from model.encoder_config import FRAME_SIZE
from storage.attrs import SEED_WINDOW_FRAMES, SamplingRecord

from tasks.workers import Messages, WorkerPool, WorkerPoolError

log = logging.getLogger(__name__)




class DecodeConfig(BaseModel):
    """Which frames are taken from each video and how the decode workers run."""

    frames: int = Field(24, ge=1, le=1024, description="frames kept per video")
    sampling: Literal["window", "spread"] = Field(
        "window", description="window: the seed's, the first window_frames frames, of which `frames` at "
                              "floor(linspace(0, n-1, frames)); spread: `frames` evenly spaced over the whole video "
                              "(another experiment: frames seconds apart)")
    window_frames: int = Field(SEED_WINDOW_FRAMES, ge=1, le=100_000,
                               description="length of the window in frames (sampling=window); the seed's is 72")
    size: int = Field(FRAME_SIZE, ge=8, le=4096, description="short side resized to this, then centre crop size x "
                                                             "size (a precompute needs encoder.frame_size here)")
    timeout_s: float = Field(120.0, gt=0, description="seconds one video may take before its worker is killed")
    workers: int = Field(2, ge=1, le=256, description="decode worker processes")
    threads_per_worker: int = Field(1, ge=0, le=64, description="decoder threads per worker (0: ffmpeg decides)")

    @model_validator(mode="after")
    def _window_holds_the_frames(self) -> "DecodeConfig":
        if self.sampling == "window" and self.window_frames < self.frames:
            raise ValueError(f"window_frames ({self.window_frames}) must be at least frames ({self.frames})")
        return self

    @property
    def window(self) -> int | None:
        """Frames of the window, or None when the frames are spread over the whole video."""
        return self.window_frames if self.sampling == "window" else None

    @property
    def resize_rule(self) -> str:
        """How frames are resized, in words (a store records it)."""
        return f"short side to {self.size} (bicubic, in the decoder), centre crop {self.size}x{self.size}"

    def sampling_record(self) -> SamplingRecord:
        """How the frames of a row are chosen, as a store records it (a rerun must choose them the same way)."""
        if self.sampling == "window":
            rule = (f"the first {self.window_frames} decodable frames (n = {self.window_frames} unless the file is "
                    f"shorter), {self.frames} kept at floor(linspace(0, n-1, {self.frames}))")
        else:
            rule = f"{self.frames} frames at rounded evenly spaced indices over all decodable frames"
        return SamplingRecord(mode=self.sampling, window_frames=self.window, frames=self.frames, rule=rule)


class DecodeError(Exception):
    """A video cannot be decoded; the message says why, in words a user can act on."""


# ---- one clip ------------------------------------------------------------------------------------------


def sample_indices(count: int, frames: int) -> np.ndarray:
    """`frames` evenly spaced indices over [0, count - 1], rounded; repeats when count < frames. (frames,) int64"""
    if count < 1:
        raise ValueError(f"cannot sample from {count} frames")
    idx = np.round(np.linspace(0, count - 1, frames)).astype(np.int64)
    return np.clip(idx, 0, count - 1)


def window_indices(count: int, frames: int) -> np.ndarray:
    """The seed's choice among the `count` frames of a window: floor(linspace(0, count - 1, frames)). (frames,) int64

    Needs count >= frames (the seed drops a video with fewer frames than it keeps).
    """
    if count < frames:
        raise ValueError(f"cannot keep {frames} distinct frames of {count}")
    return np.floor(np.linspace(0, count - 1, frames)).astype(np.int64)


def choose_indices(count: int, frames: int, window: int | None) -> np.ndarray:
    """The frames kept of a video whose first `count` frames decode: the window's, or spread over all of them."""
    if window is None:
        return sample_indices(count, frames)
    return window_indices(min(count, window), frames)


def output_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(W, H) with the short side equal to `size` and the aspect ratio kept (long side rounded)."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def centre_crop(batch: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) -> (T, size, size, 3), the middle of the frame (the extra pixel of an odd margin goes last)."""
    _, h, w, _ = batch.shape
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(batch[:, top:top + size, left:left + size])


FFMPEG_ERRORS = {  # AVERROR codes that decord prints as numbers
    -1094995529: "invalid data found when processing input",
    -541478725: "end of file",
    -22: "invalid argument",
    -12: "out of memory",
}


def describe_decord_error(err: BaseException) -> str:
    """decord's message without its '[12:00:00] /project/src/...cc:218: Check failed: ...' noise, one line."""
    text = str(err).strip().split("\n")[0]
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ", "", text)
    check = re.search(r"Check failed: .*\((-?\d+) vs\. -?\d+\) (.*)", text)
    if check:
        code, text = int(check.group(1)), check.group(2).strip()
        if code in FFMPEG_ERRORS:
            text = f"{text.rstrip('.')} (ffmpeg: {FFMPEG_ERRORS[code]})"
    return text[:200] or type(err).__name__


IMAGE_SIGNATURES = {  # leading bytes of still-image files that ffmpeg opens as one-frame "videos" without metadata
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP",
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}


def still_image_format(path: str) -> str | None:
    """'PNG', 'JPEG', ... when the file starts like a still image, else None (WebP: RIFF....WEBP)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in IMAGE_SIGNATURES.items() if head.startswith(magic)), None)


def open_reader(path: str, num_threads: int, width: int = -1, height: int = -1) -> decord.VideoReader:
    """A decord reader, or a DecodeError that says why the file cannot be opened."""
    file = Path(path)
    if not file.is_file():
        if file.is_dir():
            raise DecodeError(f"cannot open: {path} is a folder, not a video file")
        if file.exists():
            raise DecodeError(f"cannot open: {path} is not a regular file (a pipe, socket or device)")
        raise DecodeError(f"cannot open: no such file {path}")
    if file.stat().st_size == 0:
        raise DecodeError("cannot open: the file is empty (0 bytes)")
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads)
    except decord.DECORDError as err:
        text = str(err)
        image = still_image_format(path)
        if image:  # ffmpeg's image demuxers give decord a frame but no duration: say what the file is instead
            raise DecodeError(f"cannot open: the file is a still {image} image, not a video") from None
        if "broken metadata" in text:
            raise DecodeError(
                "cannot open: the container has no duration or frame count (broken metadata); remuxing it, "
                "e.g. `ffmpeg -i IN -c copy OUT.mkv`, writes them") from None
        if "cannot find video stream" in text:
            raise DecodeError("cannot open: the file has no video stream") from None
        raise DecodeError(f"cannot open: {describe_decord_error(err)}") from None
    except (RuntimeError, AssertionError):  # decord: 'Error reading X...' / 'Invalid frame count: 0'
        image = still_image_format(path)
        if image:
            raise DecodeError(f"cannot open: the file is a still {image} image, not a video") from None
        raise DecodeError(
            "cannot open: ffmpeg reads no video from it (not a video, or cut off before its header/index); "
            "`ffmpeg -i FILE` shows what is wrong") from None


def frame_starts(reader: decord.VideoReader) -> np.ndarray:
    """Presentation time of every frame in seconds, from the container's index (nothing is decoded). (N,)"""
    return reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]


def _increasing(starts: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(starts)) and np.all(starts > -1e6) and np.all(np.diff(starts) > 0))


def timestamps_reliable(reader: decord.VideoReader) -> bool:
    """True when every frame has a real, strictly increasing timestamp, which decord's seeking relies on."""
    return _increasing(frame_starts(reader))


class _FrameFailed(Exception):
    """Frame `index` (and so any later one) could not be read; `reason` says why."""

    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)
        self.index, self.reason = index, reason


def read_sequential(reader: decord.VideoReader, indices: np.ndarray) -> np.ndarray:
    """Decode from the first frame on and keep the wanted ones: right even when timestamps are missing."""
    wanted, kept = set(int(i) for i in indices), {}
    for position in range(int(indices.max()) + 1):
        try:
            frame = reader.next()
        except StopIteration:
            raise _FrameFailed(position, f"the stream ends after {position} frames") from None
        except decord.DECORDError as err:
            raise _FrameFailed(position, describe_decord_error(err)) from None
        if position in wanted:
            kept[position] = frame.asnumpy()
    return np.stack([kept[int(i)] for i in indices])


def read_frames(open_sized: Callable[[], decord.VideoReader], indices: np.ndarray, seekable: bool,
                tries: int = 3) -> np.ndarray:
    """The frames at `indices`: in one decord batch when the file can be seeked, else (or when the batch fails)
    decoded in order from the first frame, which is right even without timestamps.

    decord reports a bad packet ahead (a cut-off tail) at an earlier frame than its own, and at another one from
    read to read on a busy machine: 30 reads under load of a 49-frame file whose first 46 frames decode failed
    anywhere from frame 28 to 46. So a failure is read again, and the latest failing frame of `tries` reads is
    the one that counts (one read in ten was early there, so three rarely all are).
    """
    if seekable:
        try:
            return open_sized().get_batch(indices).asnumpy()  # (T, H, W, 3)
        except decord.DECORDError:
            pass
    latest: _FrameFailed | None = None
    for _ in range(tries):
        try:
            return read_sequential(open_sized(), indices)
        except _FrameFailed as fail:
            latest = fail if latest is None or fail.index > latest.index else latest
    raise latest


class Clip(NamedTuple):
    """The frames kept of one video and how far apart they are in its time."""

    frames: np.ndarray  # (T, S, S, 3) uint8
    interval_s: float  # mean seconds between consecutive kept frames (NaN when the file has no usable clock)


def frame_interval(starts: np.ndarray | None, fps: float, indices: np.ndarray) -> float:
    """Mean seconds between consecutive kept frames: from the frames' timestamps when they are reliable, else from
    the average frame rate; NaN when neither is known."""
    if len(indices) < 2:
        return float("nan")
    if starts is not None:
        return float(starts[indices[-1]] - starts[indices[0]]) / (len(indices) - 1)
    if fps > 0 and np.isfinite(fps):
        return float(indices[-1] - indices[0]) / (len(indices) - 1) / fps
    return float("nan")


class VideoProbe(NamedTuple):
    """What read_clip needs to know of a file before decoding its frames."""

    count: int  # frames decord indexed
    out_w: int  # size the decoder scales to, short side `size`
    out_h: int
    starts: np.ndarray  # (count,) presentation times in seconds
    seekable: bool  # timestamps strictly increasing: random access is safe
    fps: float  # average frame rate


def probe_video(path: str, num_threads: int, size: int) -> VideoProbe:
    """Frame count, scaled size, timestamps and frame rate of a file; its first frame must decode."""
    probe = open_reader(path, num_threads)
    count = len(probe)
    try:
        height, width = probe.next().shape[:2]  # the upright picture's size (rotation already applied)
    except (decord.DECORDError, StopIteration) as err:
        raise DecodeError(f"frame 0 of {count} cannot be decoded: {describe_decord_error(err)}") from None
    out_w, out_h = output_size(width, height, size)
    starts = frame_starts(probe)
    return VideoProbe(count, out_w, out_h, starts, _increasing(starts), float(probe.get_avg_fps()))


def decode_clip(path: str | Path, frames: int = 24, size: int = 256, num_threads: int = 1,
                max_tail_loss: float = 0.1, window: int | None = SEED_WINDOW_FRAMES) -> np.ndarray:
    """`frames` RGB frames of a video, short side resized to `size` and centre-cropped: (frames, size, size, 3) uint8.

    The frames of `read_clip` (the seed's window by default; `window=None` spreads them over the whole video).
    """
    return read_clip(path, frames, size, num_threads, max_tail_loss, window).frames


def read_clip(path: str | Path, frames: int = 24, size: int = 256, num_threads: int = 1,
              max_tail_loss: float = 0.1, window: int | None = SEED_WINDOW_FRAMES) -> Clip:
    """The kept frames of a video and their spacing in seconds.

    With a `window`, the first min(window, frame count) frames are the span and `frames` of them are kept at
    floor(linspace(0, n-1, frames)); nothing after the window is decoded, and a video whose span has fewer than
    `frames` frames that decode is an error. Without one, `frames` rounded, evenly spaced indices over all frames
    (repeated when the video is shorter). When the last frames of the file fail (a cut-off download) and the span
    reaches them, up to `max_tail_loss` of them (at least one) are dropped and the indices chosen again; any other
    failure raises DecodeError with the reason.
    """
    path = str(path)
    decord.logging.set_level(decord.logging.QUIET)  # ffmpeg's own messages; failures are reported by us
    count, out_w, out_h, starts, seekable, fps = probe_video(path, num_threads, size)

    def open_sized() -> decord.VideoReader:
        return open_reader(path, num_threads, out_w, out_h)

    span = count if window is None else min(window, count)
    fewest = max(1, count - max(1, int(max_tail_loss * count)))
    for _ in range(4):  # each round drops a failing tail; a few rounds reach the last good frame
        if window is not None and span < frames:
            raise DecodeError(f"only {span} frames of the video decode, fewer than the {frames} a row keeps")
        indices = choose_indices(span, frames, window)
        try:
            batch = read_frames(open_sized, indices, seekable)
        except _FrameFailed as fail:
            if fail.index < fewest or span < count:  # not the file's tail: the file is broken inside
                raise DecodeError(f"frame {fail.index} of {count} cannot be decoded: {fail.reason}") from None
            log.info("%s: frames from %d of %d do not decode (%s); using the first %d",
                     path, fail.index, count, fail.reason, fail.index)
            span = fail.index
            continue
        if batch.shape != (frames, out_h, out_w, 3):
            raise DecodeError(f"decoder returned frames of shape {batch.shape}, expected {(frames, out_h, out_w, 3)}")
        interval = frame_interval(starts if seekable else None, fps, indices)
        return Clip(centre_crop(batch, size), interval)
    raise DecodeError(f"frames after {span} of {count} keep failing to decode; the file looks corrupt")


# ---- the decode pool: a WorkerPool bound to read_clip --------------------------------------------------


@dataclass
class DecodeResult:
    """The outcome of one submitted video: frames (T, S, S, 3) uint8, or the reason it failed."""

    key: str
    frames: np.ndarray | None
    error: str | None
    seconds: float
    interval_s: float = float("nan")  # mean seconds between the kept frames in the video's time


class DecodePoolError(WorkerPoolError):
    """The pool itself cannot run (workers do not start, or it was closed): not a problem of one video."""


DecodeFn = Callable[..., "Clip | np.ndarray"]

DECODE_MESSAGES = Messages(
    timeout="decode timed out after {timeout_s:g} s", died="decoder process died ({reason})",
    start=("decode workers exit while starting ({reason}): {fn} and tasks.decode must import in a fresh Python "
           "process (workers are spawned); see the worker's stderr"))


class DecodePool:
    """`config.workers` decode processes fed from a queue; results are collected by key.

    A `tasks.workers.WorkerPool` running `decode_fn`: decord can hang forever in native code holding the GIL
    (decord issue 373) or crash the process, so each video gets `config.timeout_s`, after which its worker is
    killed and replaced and the video becomes an error result. Workers are spawned, not forked (the parent has
    torch and threads). submit() returns at once, so decoding goes on while the caller encodes the previous chunk.

    decode_fn(path, frames=, size=, num_threads=, window=) -> Clip, or (T, S, S, 3) uint8 frames alone, runs in
    the workers; it must be a module-level function (it is pickled by name). Tests inject ones that hang or crash.
    """

    def __init__(self, config: DecodeConfig | None = None, decode_fn: DecodeFn = read_clip):
        self.config = config or DecodeConfig()
        c = self.config
        self._pool = WorkerPool(
            decode_fn, workers=c.workers, timeout_s=c.timeout_s, expected=(DecodeError,), name="decode",
            kwargs={"frames": c.frames, "size": c.size, "num_threads": c.threads_per_worker, "window": c.window},
            messages=DECODE_MESSAGES,
        )

    def submit(self, key: str, path: str | Path) -> None:
        """Queue one video; its result is collected later with get(key)."""
        try:
            self._pool.submit(key, str(path))
        except WorkerPoolError as err:
            raise DecodePoolError(str(err)) from None

    def get(self, key: str) -> DecodeResult:
        """Wait for the result of `key` (each video takes at most about config.timeout_s once it started)."""
        try:
            result = self._pool.get(key)
        except WorkerPoolError as err:
            raise DecodePoolError(str(err)) from None
        value = result.value  # a Clip, the frames alone, or None when the video failed
        if isinstance(value, Clip):
            return DecodeResult(key, value.frames, result.error, result.seconds, float(value.interval_s))
        return DecodeResult(key, value, result.error, result.seconds)

    def close(self) -> None:
        """Stop the workers; videos not yet decoded are dropped."""
        self._pool.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
