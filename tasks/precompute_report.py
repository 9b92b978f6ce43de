"""The precompute's pictures: throughput over the run and a few sample frames of what the store holds, as one
markdown artifact next to the `precompute-report` table (tasks/precompute_tasks.py publishes both).

The store keeps features, not frames: the sample frames are decoded again from the sources, at the store's frame
size and from its window, as the features were (remote sources, whose downloads are gone, are skipped).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from storage.store import OK, FeatureStore
from tasks.attention import source_frames, store_window
from tasks.plots import BLUE, INK, ONE_GREY, Axes, font, legend, markdown_image, nice_ticks, padded, png_bytes

SAMPLE_TILE = 128
SAMPLE_COLUMNS = 2  # samples side by side


def throughput_points(reports: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(seconds since the run's first encode call started, videos/s of the chunk committed then) per commit; a
    chunk's rate counts from the previous commit (the first one's includes the start-up)."""
    points, offset = [], 0.0
    for report in reports:
        previous = 0.0
        for commit in report.get("commits", []):
            elapsed = commit["seconds"] - previous
            if elapsed > 0:
                points.append((offset + commit["seconds"], commit["videos"] / elapsed))
            previous = commit["seconds"]
        offset += float(report.get("seconds", 0.0))
    return points


def throughput_plot(points: list[tuple[float, float]], average: float | None) -> Image.Image:
    """videos/s per committed chunk across the run, with the run's average dashed."""
    canvas = Image.new("RGB", (760, 340), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((16, 10), "Throughput: videos per second of each committed chunk", fill=INK, font=font(14))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    top = max(ys + [average or 0.0]) * 1.1 or 1.0
    axes = Axes((80, 56, 736, 266), padded(0.0, max(xs), 0.04) if xs else (0.0, 1.0), (0.0, top))
    x_ticks = [v for v in nice_ticks(*axes.x_range, 7) if axes.x_range[0] <= v <= axes.x_range[1]]
    axes.frame(pen, "seconds since encoding started", "videos/s", x_ticks, nice_ticks(0.0, top, 5))
    if average:
        axes.hline(pen, average, ONE_GREY)
    axes.line(pen, xs, ys, BLUE)
    legend(pen, (80, 322), [("videos/s of the chunk", BLUE)]
           + ([(f"whole run: {average:.3g} videos/s", ONE_GREY)] if average else []))
    return canvas


def sample_rows(store: FeatureStore, count: int) -> list[int]:
    """The first `count` ok rows whose source is a file this machine can read again."""
    status, sources = store.read_status(), store.read_column("source")
    return [int(r) for r in np.flatnonzero(status == OK) if "://" not in str(sources[r])][:count]


def sample_frames(store: FeatureStore, count: int = 6) -> tuple[Image.Image | None, int]:
    """A grid of `count` ok rows: each its first, middle and last stored frame, its id and caption. Returns the
    picture (None when no row could be decoded) and how many rows it shows."""
    frame_size, window = store_window(store)
    frames = store.shapes.frames
    used = np.array([0, frames // 2, frames - 1])
    ids, captions, sources = (store.read_column(name) for name in ("video_id", "caption", "source"))
    samples = []
    for row in sample_rows(store, count):
        clip = source_frames(str(sources[row]), frames, used, frame_size, window)
        if clip is not None:
            samples.append((f"{ids[row]}: {captions[row]}", clip))
    if not samples:
        return None, 0
    return _sample_grid(samples, used, frames), len(samples)


def _sample_grid(samples: list[tuple[str, np.ndarray]], used: np.ndarray, frames: int) -> Image.Image:
    cell_w, cell_h = 3 * SAMPLE_TILE + 24, SAMPLE_TILE + 58
    rows = math.ceil(len(samples) / SAMPLE_COLUMNS)
    canvas = Image.new("RGB", (SAMPLE_COLUMNS * cell_w + 8, rows * cell_h + 30), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((8, 8), f"Stored frames {used[0]}, {used[1]} and {used[2]} of {frames} per video, decoded again from "
                     f"the source", fill=INK, font=font(13))
    for k, (caption, clip) in enumerate(samples):
        x, y = 8 + (k % SAMPLE_COLUMNS) * cell_w, 30 + (k // SAMPLE_COLUMNS) * cell_h
        for j, frame in enumerate(clip):
            canvas.paste(Image.fromarray(frame).resize((SAMPLE_TILE, SAMPLE_TILE), Image.BILINEAR),
                         (x + j * (SAMPLE_TILE + 4), y))
        text = "\n".join(textwrap.wrap(caption, 62)[:3])
        pen.multiline_text((x, y + SAMPLE_TILE + 4), text, fill=INK, font=font(11), spacing=2)
    return canvas


def precompute_markdown(store_path: str, info: dict[str, Any], reports: list[dict[str, Any]],
                        samples: int = 6) -> tuple[str, str]:
    """(markdown, description) of the `precompute-overview` artifact."""
    points = throughput_points(reports)
    seconds = sum(float(r.get("seconds", 0.0)) for r in reports)
    done = sum(r.get("videos_ok", 0) + r.get("videos_failed", 0) for r in reports)
    average = done / seconds if seconds else None
    summary = f"{info['ok']} ok, {info['failed']} failed, {info['pending']} pending"
    lines = [f"# Precompute of `{store_path}`", "", summary + (f"; {average:.3g} videos/s this run" if average else ""),
             ""]
    if points:
        lines += [markdown_image("throughput", png_bytes(throughput_plot(points, average))), ""]
    else:
        lines += ["No per-chunk times: nothing was encoded by this run, or its chunks were encoded by worker runs "
                  "(each has its own progress artifact).", ""]
    store = FeatureStore.open(store_path)
    grid, shown = sample_frames(store, samples)
    lines += ["## What the store holds", ""]
    if grid is not None:
        lines += [f"{shown} ok videos with their captions: the frames their features were made from.", "",
                  markdown_image("sample frames", png_bytes(grid)), ""]
    else:
        lines += ["No ok video whose source this machine can read again (remote sources are not kept).", ""]
    return "\n".join(lines), f"{summary} ({store_path})"
