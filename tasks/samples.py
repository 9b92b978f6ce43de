"""Sample videos for the demo and the tests, rendered with numpy and encoded by the ffmpeg of imageio-ffmpeg.

The demo's collection is made of `cue` videos (tasks/cue_scene.py: a positive control of the foveation gain), or
of `cue_none` videos, its negative control. Two more patterns, for tests and benchmarks:
- `moving_object`: a small bright disc or square moving at constant speed, bouncing off the borders, over a
  static smooth-noise texture (the benchmarks' and tests' ordinary video).
- `gradient`: red grows left to right, green top to bottom, blue with time (frame i of n has blue
  255 * i / (n - 1)), plus a white marker in the upper left quadrant. No rotation or flip maps it onto itself,
  so it shows whether a decoder turned a frame upright, and the blue channel tells which frame was decoded.

`size` is always the displayed (upright) size. With `rotate` the file stores the frames turned
counter-clockwise by that angle and a display matrix that tells players to turn them back, the way phones
write portrait videos (`rotate=90` is what a phone held upright writes; ffmpeg shows it as "rotation of -90").
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

from tasks.cue_scene import SIZE, Control, CueScene, render_cue_video, state_of_frames

log = logging.getLogger(__name__)

PATTERNS = ("moving_object", "gradient", "cue", "cue_none")
# Default codec per suffix, and fast encoder settings (these are test and demo files, not archives).
CODECS = {
    ".mp4": "libx264",
    ".mov": "libx264",
    ".mkv": "libx264",
    ".webm": "libvpx-vp9",
    ".avi": "mjpeg",
}
ENCODER_ARGS = {
    "libx264": ["-preset", "veryfast", "-crf", "20"],
    "libvpx-vp9": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "0", "-crf", "32", "-row-mt", "1"],
    "libvpx": ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M"],
    "mjpeg": ["-q:v", "4"],
    "mpeg4": ["-q:v", "4"],
}
# Display-matrix rotation is stored by mp4/mov and matroska/webm; AVI has no field for it.
ROTATION_CONTAINERS = (".mp4", ".mov", ".mkv", ".webm")


class SampleVideoError(RuntimeError):
    """A sample video could not be written (bad arguments or an ffmpeg failure)."""


DEMO_VIDEOS = 640  # rows of the demo's manifest: about 510 kept videos, 400 to train on (fewer get memorised)


class DemoCollectionError(ValueError):
    """A folder already holds a demo collection made with other settings."""


# ---- rendering ---------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Random values on a grid of `cell`-pixel squares, bilinearly interpolated: (H, W, 3) in [0, 1]."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.random((gh, gw, 3))
    y = np.arange(height) / cell
    x = np.arange(width) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted, smooth random texture with a per-video tint: (H, W, 3) uint8 in about [40, 170]."""
    short = min(height, width)
    noise = 0.6 * smooth_noise(rng, height, width, max(4, short // 6))
    noise += 0.4 * smooth_noise(rng, height, width, max(2, short // 20))
    tint = rng.uniform(0.6, 1.0, size=3)
    return (40 + 130 * noise * tint).astype(np.uint8)


OBJECT_COLOURS = {
    "red": (255, 30, 30), "yellow": (255, 230, 0), "cyan": (0, 235, 255),
    "magenta": (255, 0, 230), "green": (40, 255, 60), "white": (255, 255, 255),
}


@dataclass
class MovingObject:
    """A disc or square of `radius` pixels moving at constant velocity and bouncing off the borders."""

    shape: str
    colour: str
    radius: int
    start: np.ndarray  # (2,) x, y of the centre at t = 0
    velocity: np.ndarray  # (2,) pixels per second

    def centre(self, t: float, width: int, height: int) -> tuple[float, float]:
        """Centre at time t: free motion folded back into the box (a bounce is a reflection)."""
        lo = np.array([self.radius, self.radius], float)
        span = np.array([width, height], float) - 2 * self.radius
        pos = (self.start + self.velocity * t - lo) % (2 * span)
        pos = np.where(pos > span, 2 * span - pos, pos)
        return float(pos[0] + lo[0]), float(pos[1] + lo[1])

    def draw(self, frame: np.ndarray, t: float) -> None:
        """Paint the object into `frame` (H, W, 3) in place."""
        height, width = frame.shape[:2]
        cx, cy = self.centre(t, width, height)
        r = self.radius
        x0, x1 = max(0, int(cx - r)), min(width, int(cx + r) + 1)
        y0, y1 = max(0, int(cy - r)), min(height, int(cy + r) + 1)
        if self.shape == "disc":
            yy, xx = np.mgrid[y0:y1, x0:x1]
            inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
            frame[y0:y1, x0:x1][inside] = OBJECT_COLOURS[self.colour]
        else:
            frame[y0:y1, x0:x1] = OBJECT_COLOURS[self.colour]


def random_object(rng: np.random.Generator, width: int, height: int, duration_s: float) -> MovingObject:
    """An object that crosses the frame 1.5 to 3 times over the video, whatever its length, in a random direction.

    Speed scales with 1/duration so that consecutive frames of the 24 sampled per video are always a
    short, predictable step apart.
    """
    short = min(width, height)
    radius = max(3, round(0.05 * short))  # 24 px across on a 240 px short side
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(1.5, 3.0) * short / max(duration_s, 1e-3)
    start = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
    return MovingObject(
        shape=str(rng.choice(["disc", "square"])), colour=str(rng.choice(list(OBJECT_COLOURS))),
        radius=radius, start=start, velocity=speed * np.array([np.cos(angle), np.sin(angle)]),
    )


def gradient_frame(width: int, height: int) -> np.ndarray:
    """Red by x, green by y, white marker in the upper left quadrant; blue is set per frame: (H, W, 3) uint8."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 0] = np.linspace(0, 255, width).round().astype(np.uint8)[None, :]
    frame[..., 1] = np.linspace(0, 255, height).round().astype(np.uint8)[:, None]
    # The marker sits well inside the centre square, so a centre crop of any aspect ratio keeps it.
    frame[int(0.30 * height):int(0.42 * height), int(0.30 * width):int(0.42 * width)] = 255
    return frame


def object_scene(seed: int, width: int, height: int, duration_s: float) -> tuple[np.ndarray, MovingObject]:
    """The static background and the moving object of one `moving_object` video, both from its seed."""
    rng = np.random.default_rng(seed)
    background = textured_background(rng, height, width)
    return background, random_object(rng, width, height, duration_s)


def render_frames(pattern: str, count: int, fps: float, width: int, height: int, seed: int):
    """Yield `count` upright frames (H, W, 3) uint8 of a pattern.

    The same array is yielded each time, overwritten in place (no allocation per frame): copy it to keep it.
    """
    if pattern in ("cue", "cue_none"):
        if (width, height) != (SIZE, SIZE):
            raise SampleVideoError(f"{pattern} videos are {SIZE}x{SIZE}, got {width}x{height}")
        yield from render_cue_video(seed, count, "cue" if pattern == "cue" else "none")[1]
        return
    if pattern == "gradient":
        frame = gradient_frame(width, height)
        marker = frame.min(axis=-1) == 255  # (H, W) the white square, which stays white
        for i in range(count):
            frame[..., 2] = round(255 * i / max(count - 1, 1))  # blue encodes time
            frame[marker] = 255
            yield frame
        return
    background, thing = object_scene(seed, width, height, count / fps)
    frame = np.empty_like(background)
    for i in range(count):
        frame[...] = background
        thing.draw(frame, i / fps)
        yield frame


# ---- encoding ------------------------------------------------------------------------------------------


def pixel_format(codec: str, width: int, height: int) -> list[str]:
    """Output pixel format arguments. 4:2:0 H.264 needs even sizes, so odd sizes use 4:4:4 (High 4:4:4).

    VP8/VP9 and MJPEG store odd sizes in 4:2:0 themselves; MJPEG is full range (JPEG).
    """
    if codec == "mjpeg":
        return ["-pix_fmt", "yuv420p", "-color_range", "pc"]
    if codec.startswith("libx264") and (width % 2 or height % 2):
        return ["-pix_fmt", "yuv444p"]
    return ["-pix_fmt", "yuv420p"]


def ffmpeg_command(path: Path, fps: float, coded_size: tuple[int, int], codec: str, rotate: int | None) -> list[str]:
    """The ffmpeg command that reads raw RGB frames of `coded_size` (W, H) from stdin and writes `path`."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{coded_size[0]}x{coded_size[1]}"]
    cmd += ["-framerate", f"{fps}"]
    if rotate:
        # -display_rotation is counter-clockwise; the phone-style `rotate` tag is clockwise. -noautorotate:
        # encode the frames as they come instead of turning them upright (that would drop the matrix).
        cmd += ["-display_rotation", str(-rotate), "-noautorotate"]
    cmd += ["-i", "pipe:0", "-an", "-c:v", codec, *ENCODER_ARGS.get(codec, [])]
    cmd += pixel_format(codec, *coded_size)
    cmd += [str(path)]
    return cmd


def make_video(path: str | Path, duration_s: float, fps: float = 10, size: tuple[int, int] = (320, 240),
               pattern: str = "moving_object", seed: int = 0, rotate: int | None = None,
               codec: str | None = None) -> Path:
    """Write a video of round(duration_s * fps) frames of `size` (W, H) as displayed; returns its path.

    The codec follows the suffix unless given (.mp4/.mov/.mkv: libx264, .webm: libvpx-vp9, .avi: mjpeg).
    Odd sizes are kept exactly (see `pixel_format`). `rotate` (90, 180 or 270, clockwise as phones tag it)
    stores turned frames plus a display matrix; players and decord show them upright again.
    """
    path = Path(path)
    width, height = int(size[0]), int(size[1])
    count = round(duration_s * fps)
    codec = codec or CODECS.get(path.suffix.lower())
    if codec is None:
        raise SampleVideoError(f"no default codec for suffix {path.suffix!r} of {path}; pass codec= "
                               f"or use one of {sorted(CODECS)}")
    if pattern not in PATTERNS:
        raise SampleVideoError(f"unknown pattern {pattern!r}; use one of {PATTERNS}")
    if count < 1 or width < 2 or height < 2:
        raise SampleVideoError(f"{path}: needs at least one frame of 2x2 pixels "
                               f"(got {count} frames of {width}x{height})")
    rotate = (rotate or 0) % 360
    if rotate not in (0, 90, 180, 270):
        raise SampleVideoError(f"rotate must be a multiple of 90 degrees, got {rotate}")
    if rotate and path.suffix.lower() not in ROTATION_CONTAINERS:
        raise SampleVideoError(f"{path.suffix} files cannot carry rotation metadata; use one of {ROTATION_CONTAINERS}")
    turns = rotate // 90
    coded = (height, width) if turns % 2 else (width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen(ffmpeg_command(path, fps, coded, codec, rotate), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for frame in render_frames(pattern, count, fps, width, height, seed):
            proc.stdin.write(np.ascontiguousarray(np.rot90(frame, turns)).tobytes())  # (H', W', 3)
    except BrokenPipeError:
        pass  # ffmpeg stopped early; its exit status and message below say why
    finally:
        _, err = proc.communicate()
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[-500:]
        raise SampleVideoError(f"ffmpeg could not write {path} with {codec}: {message}")
    log.debug("wrote %s (%d frames, %.2f s)", path, count, time.perf_counter() - started)
    return path


# ---- the demo collection -------------------------------------------------------------------------------


def iso_duration(seconds: int) -> str:
    """WebVid's duration format: 83 -> 'PT00H01M23S'."""
    return f"PT{seconds // 3600:02d}H{seconds % 3600 // 60:02d}M{seconds % 60:02d}S"


def demo_durations(rng: np.random.Generator, n: int, ordinary: list[int]) -> list[int]:
    """Whole seconds for n rows: mostly 20-60 s, about one in ten below 20 s and one in ten above 60 s.

    Only rows in `ordinary` get a duration outside 20-60 s, so that the special rows (blank caption,
    duplicate, rotated) are not also dropped for their duration.
    """
    durations = [int(d) for d in rng.integers(20, 61, size=n)]
    outside = min(max(1, round(0.1 * n)), len(ordinary) // 2)
    picked = rng.choice(ordinary, size=2 * outside, replace=False)
    for i in picked[:outside]:
        durations[i] = int(rng.integers(4, 19))
    for i in picked[outside:]:
        durations[i] = int(rng.integers(62, 80))
    return durations


def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """A WebVid-style CSV of `rows` (the columns of the first row, in its order); returns its path."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_demo_collection(folder: str | Path, n_videos: int = 32, seed: int = 0, control: Control = "cue",
                         fps: float = 5) -> Path:
    """Write a WebVid-style collection (videos/ and manifest.csv) into `folder`; returns the manifest path.

    The videos are `cue` videos (tasks/cue_scene.py), or with control="none" its negative control, 128 x 128 at
    `fps` frames per second. The manifest has `n_videos` rows (videoid, contentUrl relative to the manifest,
    duration as ISO-8601, name = caption, page_dir). Durations are the real ones, in whole seconds: most 20-60 s,
    some outside. Row 3 has a blank caption and the last row repeats the first row's videoid and file (a
    duplicate), so a listing with the default filters keeps fewer rows than it reads. A few files are .mkv or
    .webm, and one is a phone-style rotated .mp4, so the collection also exercises containers and rotation.
    """
    if n_videos < 1:
        raise SampleVideoError(f"n_videos must be at least 1, got {n_videos}")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    blank, rotated, duplicate = 3, 2, n_videos - 1
    ordinary = [i for i in range(n_videos) if i not in (0, blank, rotated, duplicate)]  # 0: duplicated
    durations = demo_durations(rng, n_videos, ordinary)
    pattern = "cue" if control == "cue" else "cue_none"
    started = time.perf_counter()

    def make(i: int) -> dict[str, Any]:
        video_id = str(1000 + i)
        suffix = {5: ".mkv", 8: ".webm"}.get(i % 11, ".mp4")
        relative = f"videos/{video_id}{suffix}"
        video_seed = seed * 100_003 + i
        make_video(folder / relative, durations[i], fps=fps, size=(SIZE, SIZE), pattern=pattern, seed=video_seed,
                   rotate=90 if i == rotated else None)
        scene = CueScene.draw(video_seed, int(state_of_frames(round(durations[i] * fps)).max()) + 1, control)
        return {"videoid": video_id, "contentUrl": relative, "duration": iso_duration(durations[i]),
                "name": "" if i == blank else scene.caption(), "page_dir": "demo"}

    made = [i for i in range(n_videos) if not (i == duplicate and i > 0)]
    # ffmpeg encodes in its own process: one thread per core keeps every core busy.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = list(pool.map(make, made))
    if len(rows) < n_videos:  # the duplicate: the first row's id and file again
        rows.append(dict(rows[0]))
    manifest = write_manifest(folder / "manifest.csv", rows)
    log.info("demo collection: %d rows in %s (%.1f s)", len(rows), manifest, time.perf_counter() - started)
    return manifest


def ensure_demo_collection(folder: str | Path, n_videos: int, seed: int, control: Control) -> Path:
    """The manifest of the demo collection in `folder`, made unless the folder already holds this one.

    `collection.json` records how the collection was made, so that a demo with another control, seed or count is
    never trained on these videos by mistake.
    """
    folder = Path(folder)
    manifest, marker = folder / "manifest.csv", folder / "collection.json"
    recipe = {"kind": "cue-scene", "control": control, "videos": n_videos, "seed": seed}
    if manifest.exists():
        made = json.loads(marker.read_text()) if marker.exists() else "an older kind of demo videos"
        if made != recipe:
            raise DemoCollectionError(f"{folder} holds another demo collection ({made}), not {recipe}: "
                                      f"use another --workdir, or remove {folder.parent}")
        return manifest
    make_demo_collection(folder, n_videos=n_videos, seed=seed, control=control)
    marker.write_text(json.dumps(recipe))
    return manifest


# ---- odd videos for robustness tests ---------------------------------------------------------------------


def make_vfr_video(path: str | Path, frames: int = 50, fps: float = 10, size: tuple[int, int] = (320, 240),
                   pattern: str = "gradient", seed: int = 0) -> Path:
    """A variable frame rate video: frame i is shown at (i + i^2 / 40) / fps seconds, so the gaps between frames
    grow from 1/fps to several times that, as in screen recordings and phone videos that slow down in the dark.

    The frames are those of `make_video` (with `gradient`, blue still tells which frame was decoded); only their
    timestamps change (`setpts`, muxed with `-fps_mode vfr` so no frame is dropped or duplicated).
    """
    path = Path(path)
    constant = path.with_name(f".{path.stem}.cfr{path.suffix}")
    make_video(constant, frames / fps, fps=fps, size=size, pattern=pattern, seed=seed)
    codec = CODECS.get(path.suffix.lower(), "libx264")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(constant),
           "-vf", "setpts=(N+N*N/40)/FRAME_RATE/TB", "-fps_mode", "vfr", "-c:v", codec,
           *ENCODER_ARGS.get(codec, []), *pixel_format(codec, *size), str(path)]
    done = subprocess.run(cmd, capture_output=True, check=False)
    constant.unlink(missing_ok=True)
    if done.returncode != 0:
        raise SampleVideoError(f"ffmpeg could not retime {path}: {done.stderr.decode(errors='replace')[-500:]}")
    return path
