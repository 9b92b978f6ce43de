"""The training chain's report: the held-out ratio and both losses across chunks as a picture, the table of chunks,
the decision and the latest chunk's attention pictures, as one markdown artifact (tasks/chain.py publishes it).

Plain functions; the pictures are embedded as `data:` URIs because the Prefect UI cannot read the worker's disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from tasks.convergence import Decision
from tasks.plots import (
    BLUE,
    INK,
    ONE_GREY,
    ORANGE,
    Axes,
    font,
    legend,
    markdown_image,
    nice_ticks,
    padded,
    png_bytes,
    thumbnail,
)

WINDOW = (222, 235, 250)  # the convergence window's background
BAND = (252, 214, 170)  # the tolerance band
ONE = ONE_GREY  # the line ratio = 1
PLOT_SIZE = (760, 600)
PICTURE_BUDGET = 450_000  # bytes of attention PNGs embedded in one artifact; the rest are listed by path


def finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def tolerance_band(ratios: list[float], window: int, tolerance_pct: float) -> tuple[float, float]:
    """The band the last `window` ratios must fit in for the ratio to have settled (tasks/convergence.py: their
    spread max - min below tolerance_pct % of their mean): tolerance_pct % of the mean tall, centred on the
    middle of their range."""
    recent = finite(ratios[-window:]) or [1.0]
    mean, middle = sum(recent) / len(recent), (max(recent) + min(recent)) / 2
    half = abs(mean) * tolerance_pct / 100 / 2
    return middle - half, middle + half


def ratio_axes(history: list[dict[str, Any]], window: int, tolerance_pct: float) -> Axes:
    """The upper panel's axes: every chunk, every ratio, the line ratio = 1 and the tolerance band in view."""
    chunks = [h["chunk"] for h in history]
    band = tolerance_band([h["ratio"] for h in history], window, tolerance_pct)
    values = finite([h["ratio"] for h in history]) + [1.0, *band]
    return Axes((80, 56, PLOT_SIZE[0] - 24, 300), (min(chunks) - 0.5, max(chunks) + 0.5),
                padded(min(values), max(values)))


def loss_axes(history: list[dict[str, Any]]) -> Axes:
    chunks = [h["chunk"] for h in history]
    values = finite([h.get(k) for h in history for k in ("loss_fine", "loss_coarse")]) or [0.0, 1.0]
    return Axes((80, 392, PLOT_SIZE[0] - 24, PLOT_SIZE[1] - 56), (min(chunks) - 0.5, max(chunks) + 0.5),
                padded(min(values), max(values)))


def chunk_ticks(chunks: list[int]) -> list[float]:
    return [float(c) for c in chunks] if len(chunks) <= 12 else [v for v in nice_ticks(min(chunks), max(chunks), 8)
                                                                if float(v).is_integer()]


def ratio_plot(history: list[dict[str, Any]], window: int, tolerance_pct: float) -> Image.Image:
    """Two panels over the chunks: the held-out ratio (with the window, the tolerance band and ratio = 1 marked),
    then loss_fine and loss_coarse."""
    canvas = Image.new("RGB", PLOT_SIZE, (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((16, 10), "Held-out ratio across chunks (loss_coarse / loss_fine; above 1 the fine pass is better)",
             fill=INK, font=font(14))
    _ratio_panel(pen, history, window, tolerance_pct)
    _loss_panel(pen, history)
    return canvas


def _ratio_panel(pen: ImageDraw.ImageDraw, history: list[dict[str, Any]], window: int, tolerance_pct: float) -> None:
    axes = ratio_axes(history, window, tolerance_pct)
    chunks, ratios = [h["chunk"] for h in history], [h["ratio"] for h in history]
    recent = chunks[-window:]
    left_x, right_x = axes.x(recent[0] - 0.45), axes.x(recent[-1] + 0.45)
    pen.rectangle([left_x, axes.box[1] + 1, right_x, axes.box[3] - 1], fill=WINDOW)
    low, high = tolerance_band(ratios, window, tolerance_pct)
    pen.rectangle([left_x, axes.y(high), right_x, axes.y(low)], fill=BAND)
    ticks = nice_ticks(*axes.y_range, 6)
    axes.frame(pen, "chunk", "held-out ratio", chunk_ticks(chunks), ticks, x_text=lambda v: f"{v:.0f}")
    axes.hline(pen, 1.0, ONE)
    pen.text((axes.box[2] - 4, axes.y(1.0) - 3), "ratio = 1 (fine = coarse)", fill=ONE, font=font(11), anchor="rs")
    axes.line(pen, chunks, [float(r) if r is not None else math.nan for r in ratios], BLUE)
    legend(pen, (axes.box[0], axes.box[3] + 50), [
        ("ratio", BLUE), (window_label(len(chunks), window), WINDOW),
        (f"tolerance: {tolerance_pct:g} % of the window's mean", BAND), ("ratio = 1", ONE)])


def window_label(chunks: int, window: int) -> str:
    """'window: last 3 chunks', or, before there are that many, 'window: 2 of 3 chunks so far'."""
    return f"window: last {window} chunks" if chunks >= window else f"window: {chunks} of {window} chunks so far"


def _loss_panel(pen: ImageDraw.ImageDraw, history: list[dict[str, Any]]) -> None:
    axes = loss_axes(history)
    chunks = [h["chunk"] for h in history]
    axes.frame(pen, "chunk", "held-out loss", chunk_ticks(chunks), nice_ticks(*axes.y_range, 5),
               x_text=lambda v: f"{v:.0f}")
    for name, colour in (("loss_fine", BLUE), ("loss_coarse", ORANGE)):
        axes.line(pen, chunks, [float(h.get(name, math.nan)) for h in history], colour)
    legend(pen, (axes.box[0], axes.box[3] + 46), [("loss_fine (foveated)", BLUE), ("loss_coarse (static)", ORANGE)])


BAR_FULL_SCALE = 0.10  # a full bar is at least 10 % from 1: a chunk at +0.04 % gets no bar, whatever the others do


def ratio_bar(ratio: float, largest: float, width: int = 20) -> str:
    """A text bar from 1.0: `+` per step above 1, `-` below, `width` long at the largest distance from 1 (or at
    10 %, if every chunk is closer); `= 1` when about equal."""
    steps = round(width * abs(ratio - 1.0) / max(largest, BAR_FULL_SCALE))
    return "`= 1`" if steps == 0 else f"`{('+' if ratio > 1 else '-') * steps}`"


def chunk_rows_markdown(history: list[dict[str, Any]], decision: Decision) -> list[str]:
    """The table of chunks: losses with 4 significant digits, the ratio and its bar from 1."""
    lines = ["| chunk | steps | samples/s | loss_fine | loss_coarse | ratio | from 1 | improvement % |",
             "|---:|---:|---:|---:|---:|---:|:--|---:|"]
    largest = max((abs(h["ratio"] - 1.0) for h in history if _ok(h["ratio"])), default=0.0)
    for h in history:
        bar = ratio_bar(h["ratio"], largest) if _ok(h["ratio"]) else "n/a"
        lines.append(f"| {h['chunk']} | {h['step']} | {h.get('samples_per_s', 0.0):.1f} | {_sig(h['loss_fine'])} | "
                     f"{_sig(h['loss_coarse'])} | {_sig(h['ratio'], 5)} | {bar} | {h['improvement_pct']:+.2f} |")
    return lines


def _ok(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _sig(value: Any, digits: int = 4) -> str:
    return f"{float(value):.{digits}g}" if value is not None else "n/a"


def decision_line(decision: Decision) -> str:
    status = "converged" if decision.converged else ("stopped" if decision.done else "continuing")
    return f"**{status}** after {decision.chunks_done} chunks: {decision.reason}"


def picture_markdown(pictures: list[Path], budget: int = PICTURE_BUDGET) -> list[str]:
    """The attention pictures embedded in turn until `budget` bytes of PNG, the rest named by path."""
    lines, spent = [], 0
    for path in pictures:
        png = path.read_bytes()
        if spent + len(png) > budget:
            lines += [f"- not embedded (size): `{path}`", ""]
            continue
        spent += len(png)
        lines += [f"**{path.stem}**", "", markdown_image(path.stem, png), ""]
    return lines


def ratio_markdown(history: list[dict[str, Any]], decision: Decision, wandb_link: str, pictures: list[Path],
                   plot_png: bytes) -> str:
    """The whole report: plot, decision, table of chunks, wandb run, attention pictures."""
    lines = ["# Held-out ratio across chunks", "", markdown_image("held-out ratio and losses across chunks", plot_png),
             "", decision_line(decision), "",
             "`ratio = loss_coarse / loss_fine`; above 1 the foveated (fine) pass predicts the next frame better. "
             "The bars start at 1.", "", *chunk_rows_markdown(history, decision), "", f"**wandb:** {wandb_link}"]
    if pictures:
        lines += ["", f"## Attention pictures of chunk {history[-1]['chunk']}", "",
                  "Each band of frames: the static (coarse) query, the foveated (fine) query, and fine / coarse "
                  "(red: the fine query looks more). Files in the run folder: "
                  f"`{pictures[0].parent}`.", ""]
        lines += picture_markdown(pictures)
    return "\n".join(lines)


def report_description(run_dir: str, decision: Decision, plot: Image.Image) -> str:
    """The artifact's card: a thumbnail of the plot and the one-line decision."""
    return "\n\n".join([markdown_image("ratio", png_bytes(thumbnail(plot, 240), colours=32)),
                        f"{decision_line(decision)} ({run_dir})"])


def chain_markdown(run_dir: str, history: list[dict[str, Any]], decision: Decision, window: int,
                   tolerance_pct: float, wandb_link: str, pictures: list[Path]) -> tuple[str, str]:
    """(markdown, description) of the `train-ratio-history` artifact."""
    plot = ratio_plot(history, window, tolerance_pct)
    markdown = ratio_markdown(history, decision, wandb_link, pictures, png_bytes(plot))
    return markdown, report_description(run_dir, decision, plot)
