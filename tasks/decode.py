"""Decode clips with decord: 24 frames per video, short side to 256, centre crop 256 x 256.

Which frames: by default the seed's window (`precompute_dino.py` runs `ffmpeg -frames:v 72` and keeps 24 of those
72 frames at `floor(linspace(0, n - 1, 24))`): the first `window` frames the file really has are decoded, the rest
of the file never is, and 24 of them are kept, every third frame of a normal video, about 0.1 s apart. Spreading
the 24 frames over the whole video (`window=None`) is another experiment (frames seconds apart, across scene
cuts) and only an explicit option.

`read_clip` decodes one file in this process (`decode_clip`: its frames alone). `DecodePool` runs it in worker
processes, because decord can
hang forever in native code holding the GIL (decord issue 373) or crash the process: the parent measures a
timeout per video, kills (SIGKILL) and replaces a worker that overruns it or dies, and turns that video into
an error result, so a bad file never stops a batch.

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
import multiprocessing as mp
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import decord
import numpy as np
from pydantic import BaseModel, Field, model_validator

log = logging.getLogger(__name__)


SEED_WINDOW_FRAMES = 72  # the seed's `-frames:v num_frames * 3`


class DecodeConfig(BaseModel):
    """Which frames are taken from each video and how the decode workers run."""

    frames: int = Field(24, ge=1, le=1024, description="frames kept per video")
    sampling: Literal["window", "spread"] = Field(
        "window", description="window: the seed's, the first window_frames frames, of which `frames` at "
                              "floor(linspace(0, n-1, frames)); spread: `frames` evenly spaced over the whole video "
                              "(another experiment: frames seconds apart)")
    window_frames: int = Field(SEED_WINDOW_FRAMES, ge=1, le=100_000,
                               description="length of the window in frames (sampling=window); the seed's is 72")
    size: int = Field(256, ge=8, le=4096, description="short side resized to this, then centre crop size x size")
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

    def describe_sampling(self) -> dict[str, Any]:
        """How the frames of a row were chosen, as a store records it (a rerun must choose them the same way)."""
        if self.sampling == "window":
            rule = (f"the first {self.window_frames} decodable frames (n = {self.window_frames} unless the file is "
                    f"shorter), {self.frames} kept at floor(linspace(0, n-1, {self.frames}))")
        else:
            rule = f"{self.frames} frames at rounded evenly spaced indices over all decodable frames"
        return {"mode": self.sampling, "window_frames": self.window, "frames": self.frames, "rule": rule}


def describe_window(sampling: dict[str, Any]) -> str:
    """'24 of the first 72 frames' / '24 frames spread over the whole video', from a sampling attribute."""
    if sampling.get("mode") == "window":
        return f"{sampling.get('frames')} of the first {sampling.get('window_frames')} frames"
    if sampling.get("mode") == "spread":
        return f"{sampling.get('frames')} frames spread over the whole video"
    return "frames chosen by an unknown rule"


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


def read_random_access(open_sized: Callable[[], decord.VideoReader], indices: np.ndarray) -> np.ndarray:
    """All frames in one decord batch; on failure, frame by frame to find the first one that fails."""
    try:
        return open_sized().get_batch(indices).asnumpy()  # (T, H, W, 3)
    except decord.DECORDError:
        pass
    reader, frames, previous = open_sized(), {}, -1
    for i in np.unique(indices):
        try:
            frames[int(i)] = reader.get_batch([int(i)]).asnumpy()[0]
        except decord.DECORDError as err:
            raise _FrameFailed(first_failure(open_sized, previous + 1, int(i)), describe_decord_error(err)) from None
        previous = int(i)
    return np.stack([frames[int(i)] for i in indices])  # the batch call failed, single frames did not


def first_failure(open_sized: Callable[[], decord.VideoReader], start: int, failing: int) -> int:
    """The first frame in [start, failing] that does not decode (`failing` is known to fail)."""
    reader = open_sized()
    for j in range(start, failing):
        try:
            reader.get_batch([j])
        except decord.DECORDError:
            return j
    return failing


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
    probe = open_reader(path, num_threads)
    count = len(probe)
    try:
        height, width = probe.next().shape[:2]  # the upright picture's size (rotation already applied)
    except (decord.DECORDError, StopIteration) as err:
        raise DecodeError(f"frame 0 of {count} cannot be decoded: {describe_decord_error(err)}") from None
    out_w, out_h = output_size(width, height, size)
    starts = frame_starts(probe)
    seekable = _increasing(starts)
    fps = float(probe.get_avg_fps())
    del probe

    def open_sized() -> decord.VideoReader:
        return open_reader(path, num_threads, out_w, out_h)

    span = count if window is None else min(window, count)
    fewest = max(1, count - max(1, int(max_tail_loss * count)))
    for _ in range(4):  # each round drops a failing tail; a few rounds reach the last good frame
        if window is not None and span < frames:
            raise DecodeError(f"only {span} frames of the video decode, fewer than the {frames} a row keeps")
        indices = choose_indices(span, frames, window)
        try:
            if seekable:
                batch = read_random_access(open_sized, indices)
            else:
                batch = read_sequential(open_sized(), indices)
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


# ---- worker processes ----------------------------------------------------------------------------------


@dataclass
class DecodeResult:
    """The outcome of one submitted video: frames (T, S, S, 3) uint8, or the reason it failed."""

    key: str
    frames: np.ndarray | None
    error: str | None
    seconds: float
    interval_s: float = float("nan")  # mean seconds between the kept frames in the video's time


class DecodePoolError(RuntimeError):
    """The pool itself cannot run (workers do not start, or it was closed): not a problem of one video."""


DecodeFn = Callable[..., "Clip | np.ndarray"]


def _worker_main(conn: Connection, decode_fn: DecodeFn, frames: int, size: int, num_threads: int,
                 window: int | None) -> None:
    """Worker loop: receive (key, path), send ('ok', key, shape, dtype, seconds, interval) + raw bytes, or
    ('error', ...)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then closes the pool
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        key, path = job
        started = time.perf_counter()
        try:
            result = decode_fn(path, frames=frames, size=size, num_threads=num_threads, window=window)
            interval = float("nan")
            if isinstance(result, Clip):
                result, interval = result.frames, float(result.interval_s)
            if not isinstance(result, np.ndarray) or result.dtype == object:
                raise TypeError(f"the decode function returned {type(result).__name__}, not a numeric numpy array")
            array = np.ascontiguousarray(result)
        except DecodeError as err:
            conn.send(("error", key, str(err), time.perf_counter() - started))
            continue
        except Exception as err:  # a bad file must not kill the worker: its failure becomes that video's error
            log.warning("unexpected error decoding %s: %r", path, err)
            conn.send(("error", key, f"unexpected {type(err).__name__}: {err}", time.perf_counter() - started))
            continue
        conn.send(("ok", key, array.shape, array.dtype.str, time.perf_counter() - started, interval))
        conn.send_bytes(memoryview(array).cast("B"))  # raw bytes: 1.7 ms per 24x256x256x3 clip, pickle 15 ms


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    job: tuple[str, str] | None = None  # (key, path) being decoded
    started: float = 0.0  # time.monotonic() when the job was sent


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class DecodePool:
    """`config.workers` decode processes fed from a queue; results are collected by key.

    submit() returns at once; a supervisor thread hands jobs to idle workers, enforces the per-video timeout
    and replaces workers that are killed or die, so decoding goes on while the caller does other work
    (encoding the previous chunk). get(key) waits for that key's result. Workers use the "spawn" start
    method: the parent has torch and threads, which fork would copy in an undefined state.

    decode_fn(path, frames=, size=, num_threads=, window=) -> Clip, or (T, S, S, 3) uint8 frames alone, runs in
    the workers; it must be a module-level function (it is pickled by name). Tests inject ones that hang or crash.
    """

    def __init__(self, config: DecodeConfig | None = None, decode_fn: DecodeFn = read_clip):
        self.config = config or DecodeConfig()
        self._decode_fn = decode_fn
        self._ctx = mp.get_context("spawn")
        self._cond = threading.Condition()
        self._pending: deque[tuple[str, str]] = deque()
        self._waiting: set[str] = set()  # submitted, not yet collected by get()
        self._results: dict[str, DecodeResult] = {}
        self._failure: str | None = None
        self._start_failures = 0
        self._closed = False
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._workers = [self._spawn() for _ in range(self.config.workers)]
        self._thread = threading.Thread(target=self._supervise, name="decode-pool", daemon=True)
        self._thread.start()

    # -- public API --

    def submit(self, key: str, path: str) -> None:
        """Queue one video; its result is collected later with get(key)."""
        with self._cond:
            if self._closed:
                raise DecodePoolError("the decode pool is closed")
            if key in self._waiting:
                raise ValueError(f"key {key!r} was submitted already and its result not collected yet")
            self._waiting.add(key)
            self._pending.append((key, str(path)))
        self._wake()

    def get(self, key: str) -> DecodeResult:
        """Wait for the result of `key` (each video takes at most about config.timeout_s once it started)."""
        with self._cond:
            if key not in self._waiting:
                raise KeyError(f"key {key!r} was not submitted, or its result was collected already")
            while key not in self._results:
                if self._failure is not None:
                    raise DecodePoolError(self._failure)
                if self._closed:
                    raise DecodePoolError("the decode pool was closed before this video was decoded")
                self._cond.wait(timeout=1.0)
            self._waiting.discard(key)
            return self._results.pop(key)

    def close(self) -> None:
        """Stop the workers; jobs not yet done are dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake()
        self._thread.join(timeout=10)
        for worker in self._workers:
            if worker.job is None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            else:  # busy on a job nobody will collect
                worker.process.kill()
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- supervisor (its own thread; every state change under self._cond) --

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, name="decode-worker", daemon=True,
            args=(child, self._decode_fn, self.config.frames, self.config.size, self.config.threads_per_worker,
                  self.config.window),
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:  # closed already
            pass

    def _supervise(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closed:
                        return
                    self._dispatch()
                    watched = [self._wake_r] + [w.conn for w in self._workers]
                    watched += [w.process.sentinel for w in self._workers]
                    timeout = self._seconds_to_next_deadline()
                ready = wait(watched, timeout)
                with self._cond:
                    if self._closed:
                        return
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                    for worker in list(self._workers):
                        pipe_open = self._receive(worker) if worker.conn in ready else True
                        if not pipe_open or worker.process.sentinel in ready:
                            self._on_exit(worker)
                    self._enforce_timeouts()
        except Exception as err:  # without the supervisor get() would wait forever: record why and wake it
            log.exception("decode pool supervisor failed")
            with self._cond:
                self._failure = f"decode pool supervisor failed: {err!r}"
                self._cond.notify_all()

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not self._pending:
                return
            if worker.ready and worker.job is None and worker.process.is_alive():
                job = self._pending.popleft()
                try:
                    worker.conn.send(job)
                except OSError:  # died just now; its sentinel will report it
                    self._pending.appendleft(job)
                    continue
                worker.job, worker.started = job, time.monotonic()

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = [w.started + self.config.timeout_s for w in self._workers if w.job is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message of a worker; False when its pipe is closed (it died, maybe mid-message)."""
        try:
            message = worker.conn.recv()
            if message[0] == "ready":
                worker.ready = True
                self._start_failures = 0
            elif message[0] == "ok":
                _, key, shape, dtype, seconds, interval = message
                frames = np.empty(shape, np.dtype(dtype))
                worker.conn.recv_bytes_into(memoryview(frames).cast("B"))
                self._finish(worker, DecodeResult(key, frames, None, seconds, interval))
            else:
                _, key, error, seconds = message
                self._finish(worker, DecodeResult(key, None, error, seconds))
        except (EOFError, OSError):
            return False
        return True

    def _finish(self, worker: _Worker, result: DecodeResult) -> None:
        worker.job = None
        self._results[result.key] = result
        self._cond.notify_all()

    def _on_exit(self, worker: _Worker) -> None:
        """A worker exited (or closed its pipe): report its job as failed and start another."""
        while worker.job is not None and self._poll(worker) and self._receive(worker):
            pass  # a result sent just before it exited still counts
        worker.process.join(timeout=5)
        if worker.process.is_alive():  # closed its pipe but lingers: it is of no use any more
            worker.process.kill()
            worker.process.join(timeout=5)
        reason = _exit_reason(worker.process.exitcode)
        if worker.job is not None:
            key, path = worker.job
            log.warning("decode worker died on %s (%s); starting another", path, reason)
            self._finish(worker, DecodeResult(key, None, f"decoder process died ({reason})",
                                              time.monotonic() - worker.started))
        elif not worker.ready:
            self._start_failures += 1
            if self._start_failures >= 3:
                fn = f"{getattr(self._decode_fn, '__module__', '?')}.{getattr(self._decode_fn, '__name__', '?')}"
                self._failure = (f"decode workers exit while starting ({reason}): {fn} and tasks.decode must "
                                 f"import in a fresh Python process (workers are spawned); see the worker's stderr")
                self._cond.notify_all()
        self._replace(worker)

    @staticmethod
    def _poll(worker: _Worker) -> bool:
        try:
            return worker.conn.poll()
        except (EOFError, OSError):
            return False

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job is not None and now - worker.started > self.config.timeout_s:
                key, path = worker.job
                log.warning("decoding %s took over %g s; killing its worker (pid %s)",
                            path, self.config.timeout_s, worker.process.pid)
                worker.process.kill()  # SIGKILL: a decoder stuck in native code ignores anything gentler
                worker.process.join(timeout=5)
                self._finish(worker, DecodeResult(key, None, f"decode timed out after {self.config.timeout_s:g} s",
                                                  now - worker.started))
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.conn.close()
        index = self._workers.index(worker)
        if self._failure is None and not self._closed:
            self._workers[index] = self._spawn()
        else:
            del self._workers[index]
