import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from tasks.chain_report import (
    BAND,
    ONE,
    WINDOW,
    chain_markdown,
    chunk_rows_markdown,
    picture_markdown,
    ratio_axes,
    ratio_bar,
    ratio_plot,
    tolerance_band,
)
from tasks.convergence import Decision
from tasks.plots import format_tick, nice_ticks, png_bytes


def history(ratios, loss=0.000612):
    return [{"chunk": i + 1, "step": 10 * (i + 1), "ratio": r, "loss_fine": loss, "loss_coarse": loss * r,
             "improvement_pct": (r - 1) * 100, "samples_per_s": 12.0} for i, r in enumerate(ratios)]


DECISION = Decision(done=False, converged=False, reason="ratio changed 2.00 % over the last 3 evaluations",
                    chunks_done=5, step=50, ratio=1.03, improvement_pct=3.0)


def colour_columns(pixels: np.ndarray, row: int, colour) -> np.ndarray:
    return np.flatnonzero((pixels[row] == colour).all(-1))


def test_the_plot_marks_ratio_one_the_window_and_the_tolerance_band():
    records = history([0.99, 1.01, 1.02, 1.025, 1.03])
    pixels = np.asarray(ratio_plot(records, window=3, tolerance_pct=1.0))
    axes = ratio_axes(records, window=3, tolerance_pct=1.0)
    one = colour_columns(pixels, round(axes.y(1.0)), ONE)
    assert len(one) > 0.3 * (axes.box[2] - axes.box[0])  # a dashed line across the panel at ratio = 1
    assert len(colour_columns(pixels, round(axes.y(1.0)) - 8, ONE)) < 20  # ... and not a band of grey

    low, high = tolerance_band([r["ratio"] for r in records], 3, 1.0)
    assert high - low == pytest.approx(0.01 * (1.02 + 1.025 + 1.03) / 3)  # 1 % of the window's mean
    band = colour_columns(pixels, round(axes.y((low + high) / 2)) + 2, BAND)
    window_left, window_right = axes.x(3 - 0.45), axes.x(5 + 0.45)
    assert band.min() >= window_left - 1 and band.max() <= window_right + 1 and len(band) > 100
    assert len(colour_columns(pixels, round(axes.y(high)) - 3, WINDOW)) > 100  # the window above the band
    assert len(colour_columns(pixels, round(axes.y(high)) - 3, BAND)) == 0
    assert axes.y(low) < axes.y(1.0)  # the band is above the line ratio = 1 here


def test_ticks_are_round_and_keep_the_digits_that_differ():
    ticks = nice_ticks(0.000611, 0.000619, 5)
    labels = [format_tick(v, ticks) for v in ticks]
    assert len(set(labels)) == len(labels) >= 3 and all(label.startswith("0.00061") for label in labels)
    assert [format_tick(v, [0.98, 1.0, 1.02]) for v in (0.98, 1.0, 1.02)] == ["0.98", "1.00", "1.02"]


def test_ratio_bars_start_at_one():
    assert ratio_bar(0.9997, largest=0.5) == "`= 1`"  # -0.03 %: no bar (it used to get 12 #)
    assert ratio_bar(1.5, largest=0.5) == f"`{'+' * 20}`" and ratio_bar(0.5, largest=0.5) == f"`{'-' * 20}`"
    assert ratio_bar(1.25, largest=0.5) == f"`{'+' * 10}`"
    # every chunk within 0.04 % of 1: still no bar, not a full one for the largest of the tiny differences
    assert ratio_bar(1.0004, largest=0.0004) == "`= 1`" and ratio_bar(1.05, largest=0.05) == f"`{'+' * 10}`"
    rows = chunk_rows_markdown(history([0.9997, 1.5]), DECISION)
    assert "`= 1`" in rows[2] and "+" * 20 in rows[3] and "``" not in "".join(rows)


def test_losses_keep_four_significant_digits():
    rows = chunk_rows_markdown(history([1.0, 0.9993]), DECISION)
    assert "0.000612 | 0.000612 |" in rows[2]
    assert "| 0.000612 | 0.0006116 |" in rows[3]  # rounded to 6 decimals both read 0.000612


def test_the_report_embeds_pngs_and_stays_small(tmp_path):
    pictures = []
    for name in ("chunk-005-a", "chunk-005-b"):
        noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        pictures.append(tmp_path / f"{name}.png")
        pictures[-1].write_bytes(png_bytes(Image.fromarray(noise)))
    markdown, description = chain_markdown("runs/x", history([0.99, 1.01, 1.02, 1.025, 1.03]), DECISION, 3, 1.0,
                                           "wandb disabled", pictures)
    uris = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    images = [Image.open(io.BytesIO(base64.b64decode(uri))) for uri in uris]
    assert [image.format for image in images] == ["PNG"] * 3 and images[0].size == (760, 600)
    assert len(markdown) < 400_000
    assert description.startswith("![ratio](data:image/png;base64,") and "**continuing** after 5 chunks" in description
    assert len(description) < 20_000


def test_pictures_over_the_budget_are_named_not_embedded(tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(png_bytes(Image.new("RGB", (50, 50), (200, 10, 10))))
    size = paths[0].stat().st_size
    lines = picture_markdown(paths, budget=size + 10)
    text = "\n".join(lines)
    assert text.count("data:image/png;base64,") == 1 and f"not embedded (size): `{paths[1]}`" in text
