"""Small charts drawn with PIL, and PNGs embedded in markdown as `data:` URIs.

The Prefect UI runs in the user's browser and cannot read the worker's disk: a picture reaches an artifact only
inside its markdown, as a base64 PNG. PNGs are quantised to a small palette so that a picture stays ~50-200 kB.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

INK = (40, 40, 40)
GRID = (225, 225, 225)
BLUE = (31, 119, 180)
ORANGE = (230, 120, 20)
GREEN = (44, 160, 44)
ONE_GREY = (90, 90, 90)  # reference lines (ratio = 1, an average)


@lru_cache(maxsize=8)
def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def png_bytes(image: Image.Image, colours: int = 128) -> bytes:
    """The picture as a PNG quantised to `colours` colours, without dithering (dither noise compresses badly).
    Octree keeps the colour ramps' hues where median cut spends the palette on the frames' greys."""
    quantised = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.FASTOCTREE,
                                              dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    quantised.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(alt: str, png: bytes) -> str:
    """`![alt](data:image/png;base64,...)`: renders in the Prefect UI's markdown (the artifact page and its card)."""
    return f"![{alt}]({data_uri(png)})"


def thumbnail(image: Image.Image, width: int = 240) -> Image.Image:
    height = max(1, round(image.height * width / image.width))
    return image.convert("RGB").resize((width, height), Image.LANCZOS)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def format_tick(value: float, ticks: Sequence[float]) -> str:
    """A tick label with the decimals its tick step needs: 0.995, 1.000, 1.005 (never 6 rounded decimals)."""
    step = min((b - a for a, b in zip(ticks, ticks[1:])), default=0.0)
    if abs(value) >= 1e5 or (0 < abs(value) < 1e-3 and step < 1e-4):
        return f"{value:.3g}"
    if step <= 0:
        return f"{value:.4g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    return f"{value:.{decimals + (1 if round(mantissa, 6) == 2.5 else 0)}f}"


def padded(low: float, high: float, fraction: float = 0.08) -> tuple[float, float]:
    """A data range with a margin on both sides (a single value gets a margin of its own)."""
    span = high - low or abs(high) * 0.05 or 1.0
    return low - fraction * span, high + fraction * span


@dataclass
class Axes:
    """A rectangle of the picture in which data coordinates are drawn: box = (left, top, right, bottom) pixels."""

    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def x(self, value: float) -> float:
        (left, _, right, _), (low, high) = self.box, self.x_range
        return left + (value - low) / (high - low) * (right - left)

    def y(self, value: float) -> float:
        (_, top, _, bottom), (low, high) = self.box, self.y_range
        return bottom - (value - low) / (high - low) * (bottom - top)

    def frame(self, pen: ImageDraw.ImageDraw, x_label: str, y_label: str, x_ticks: Sequence[float],
              y_ticks: Sequence[float], x_text=None) -> None:
        """Grid lines at the ticks, the tick values, the axis labels and the box."""
        left, top, right, bottom = self.box
        small = font(12)
        for v in y_ticks:
            y = self.y(v)
            pen.line([(left, y), (right, y)], fill=GRID)
            label = format_tick(v, y_ticks)
            pen.text((left - 6, y), label, fill=INK, font=small, anchor="rm")
        for v in x_ticks:
            x = self.x(v)
            pen.line([(x, bottom), (x, bottom + 4)], fill=INK)
            pen.text((x, bottom + 6), x_text(v) if x_text else format_tick(v, x_ticks), fill=INK, font=small,
                     anchor="mt")
        pen.rectangle(self.box, outline=INK)
        pen.text(((left + right) / 2, bottom + 22), x_label, fill=INK, font=font(13), anchor="mt")
        pen.text((left, top - 6), y_label, fill=INK, font=font(13), anchor="ls")

    def line(self, pen: ImageDraw.ImageDraw, xs: Sequence[float], ys: Sequence[float], colour, width: int = 2,
             marker: int = 3) -> None:
        """A polyline with a dot at each point; non-finite points are left out."""
        points = [(self.x(x), self.y(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            pen.line(points, fill=colour, width=width, joint="curve")
        for px, py in points:
            pen.ellipse([px - marker, py - marker, px + marker, py + marker], fill=colour)

    def hline(self, pen: ImageDraw.ImageDraw, value: float, colour, dash: int = 6) -> None:
        """A dashed horizontal line across the axes."""
        left, _, right, _ = self.box
        y = round(self.y(value))
        for x in range(left + 1, right, 2 * dash):
            pen.line([(x, y), (min(x + dash, right - 1), y)], fill=colour, width=1)


def legend(pen: ImageDraw.ImageDraw, at: tuple[int, int], entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    """Coloured swatches and their names, left to right from `at`."""
    x, y = at
    for name, colour in entries:
        pen.rectangle([x, y - 5, x + 14, y + 5], fill=colour)
        pen.text((x + 20, y), name, fill=INK, font=font(12), anchor="lm")
        x += 34 + round(pen.textlength(name, font=font(12)))
