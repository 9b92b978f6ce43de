"""Attention pictures: where the coarse (static) and the fine query look, frame by frame.

The seed's "visualize attention: see if queries focus on different regions". For a few held-out videos, the
attention of each query over the 18 x 18 patch tokens is drawn over the decoded frame (or alone when the source
video cannot be read). The frames wrap in bands of 4; each band has a row for the coarse pass, one for the last
fine pass and one for fine minus coarse. Attention is measured "x uniform" (1 = the weight each patch would get if
the query looked everywhere alike) on a log scale from FLOOR up: a trained query puts most of its weight on a few
patches, and a linear scale would show those as a few dots on black. The third row is the difference of the two
log maps, i.e. fine / coarse (red: the fine query looks more, blue: less, white: alike). Colour bars at the bottom
give both scales; the coarse and the fine row share one so that they can be compared.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.encoder_config import FRAME_SIZE
from model.foveated import EfficientFoveatedModel
from storage.loader import frame_indices
from storage.store import FeatureStore
from tasks.decode import DecodeError, decode_clip
from tasks.plots import INK, font, nice_ticks, png_bytes

log = logging.getLogger(__name__)

# A perceptually ordered dark-to-bright ramp (black, purple, red, orange, pale yellow).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
# A diverging ramp for differences: blue (negative), white (zero), red (positive).
_DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
                      dtype=np.float32)
DIFF_ROW = "fine - coarse"
FLOOR = 0.1  # x uniform: weights below this show as the bottom of the scale (and as no difference)
MIN_SPAN = math.log10(2)  # the difference scale spans at least x1/2..x2, so that a tiny difference stays pale


def colorize(heat: np.ndarray, ramp: np.ndarray = _RAMP) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours along the ramp."""
    position = np.clip(heat, 0.0, 1.0) * (len(ramp) - 1)
    low = np.floor(position).astype(int).clip(0, len(ramp) - 2)
    frac = (position - low)[..., None]
    return (ramp[low] * (1 - frac) + ramp[low + 1] * frac).astype(np.uint8)


def diverge(values: np.ndarray) -> np.ndarray:
    """(h, w) values in [-1, 1] -> blue / white / red colours."""
    return colorize((np.asarray(values) + 1.0) / 2.0, _DIVERGING)


def patch_values(weights: np.ndarray) -> np.ndarray:
    """(N,) attention over CLS + patches -> (g, g) patch weights "x uniform" (weight times the patch count)."""
    patches = np.asarray(weights, dtype=np.float32)[1:]
    side = int(math.isqrt(patches.size))
    return patches[: side * side].reshape(side, side) * (side * side)


def patch_grid(weights: np.ndarray) -> np.ndarray:
    """(N,) attention over CLS + patches -> (g, g) over the patches, scaled to [0, 1]."""
    grid = patch_values(weights)
    top = grid.max()
    return grid / top if top > 0 else grid


def log_values(values: np.ndarray) -> np.ndarray:
    """x uniform -> log10, floored at FLOOR."""
    return np.log10(np.maximum(values, FLOOR))


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """(g, g) float values -> (size, size), each patch a square (the model sees patches, not a smooth field)."""
    return np.asarray(Image.fromarray(grid.astype(np.float32), mode="F").resize((size, size), Image.NEAREST))


def draw_tile(logs: np.ndarray, frame: np.ndarray | None, size: int, scale: tuple[float, float]) -> Image.Image:
    """One frame's attention (g, g log10 x uniform) coloured on the scale (low, high), over the dimmed frame."""
    low, high = scale
    colours = colorize((upsample(logs, size) - low) / (high - low)).astype(np.float32)
    if frame is None:
        return Image.fromarray(colours.astype(np.uint8))
    grey = np.asarray(Image.fromarray(frame).convert("L").resize((size, size), Image.BILINEAR), np.float32)
    # A constant blend: the frame shows everywhere and a colour means what the colour bar says it means.
    return Image.fromarray((0.4 * grey[..., None] + 0.6 * colours).astype(np.uint8))


def draw_difference(diff: np.ndarray, size: int, span: float) -> Image.Image:
    """log10 fine - log10 coarse (g, g) on the -span..+span diverging scale: white where the two agree."""
    tile = Image.fromarray(diverge(upsample(diff, size) / span))
    ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], outline=(200, 200, 200))
    return tile


@dataclass(frozen=True)
class AttentionLayout:
    """Where each tile goes: frames in bands of `columns`, each band a row per pass, colour bars at the bottom."""

    frames: int
    rows: tuple[str, ...]
    tile: int = 160
    columns: int = 4
    label_w: int = 96
    header: int = 50
    band_head: int = 20
    gap: int = 4
    bars: int = 64

    @property
    def bands(self) -> int:
        return math.ceil(self.frames / self.columns)

    @property
    def band_h(self) -> int:
        return self.band_head + len(self.rows) * (self.tile + self.gap) + 8

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_w + self.columns * (self.tile + self.gap) + 8
        return max(width, 560), self.header + self.bands * self.band_h + self.bars

    def box(self, row: int, t: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of frame t's tile in row `row`."""
        band, column = divmod(t, self.columns)
        x = self.label_w + column * (self.tile + self.gap)
        y = self.header + band * self.band_h + self.band_head + row * (self.tile + self.gap)
        return x, y, x + self.tile, y + self.tile


def _rows(maps: dict[str, np.ndarray]) -> tuple[str, ...]:
    names = tuple(maps)
    return names + ((DIFF_ROW,) if {"coarse", "fine"} <= set(names) else ())


def draw_attention(maps: dict[str, np.ndarray], frames: np.ndarray | None, title: str, tile: int = 160,
                   columns: int = 4) -> Image.Image:
    """The picture of one video: maps[name] is (T, N) attention over CLS + patches, frames (T, H, W, 3) or None."""
    logs = {name: log_values(np.stack([patch_values(w) for w in m])) for name, m in maps.items()}  # (T, g, g)
    layout = AttentionLayout(frames=len(next(iter(logs.values()))), rows=_rows(maps), tile=tile, columns=columns)
    low = math.log10(FLOOR)
    scale = (low, max(max(float(v.max()) for v in logs.values()), low + 0.5))  # one scale for both passes
    diff = logs["fine"] - logs["coarse"] if DIFF_ROW in layout.rows else None
    span = max(float(np.abs(diff).max()), MIN_SPAN) if diff is not None else None
    canvas = Image.new("RGB", layout.size, (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((8, 6), title, fill=INK, font=font(15))
    pen.text((8, 28), f"{layout.frames} frames in bands of {columns}; attention per patch in multiples of uniform "
                      f"(1 = all {logs[next(iter(logs))].shape[-1] ** 2} patches alike), log scale",
             fill=INK, font=font(12))
    for t in range(layout.frames):
        frame = frames[t] if frames is not None else None
        for r, name in enumerate(layout.rows):
            tile_image = (draw_difference(diff[t], tile, span) if name == DIFF_ROW
                          else draw_tile(logs[name][t], frame, tile, scale))
            canvas.paste(tile_image, layout.box(r, t)[:2])
        left, y = layout.box(0, t)[:2]
        pen.text((left + 2, y - 3), f"frame {t}", fill=INK, font=font(12), anchor="ls")
    _label_rows(pen, layout)
    _colour_bars(canvas, layout, scale, span)
    return canvas


def _label_rows(pen: ImageDraw.ImageDraw, layout: AttentionLayout) -> None:
    names = {"coarse": "coarse\n(static)", "fine": "fine\n(foveated)", DIFF_ROW: "fine -\ncoarse"}
    for band in range(layout.bands):
        for r, name in enumerate(layout.rows):
            _, top, _, bottom = layout.box(r, band * layout.columns)
            pen.multiline_text((8, (top + bottom) / 2), names.get(name, name), fill=INK, font=font(13),
                               anchor="lm")


def _colour_bars(canvas: Image.Image, layout: AttentionLayout, scale: tuple[float, float],
                 span: float | None) -> None:
    """The scales: attention (log, x uniform) for the passes, fine / coarse (log) for their difference."""
    width = (canvas.width - 3 * 24) // 2
    y = canvas.height - layout.bars + 24
    _colour_bar(canvas, (24, y, 24 + width, y + 14), scale, colorize, "attention, x uniform (log scale)",
                _power)
    if span is not None:
        _colour_bar(canvas, (48 + width, y, 48 + 2 * width, y + 14), (-span, span), lambda v: diverge(v * 2 - 1),
                    "fine / coarse (red: the fine query looks more)", lambda v: "x" + _power(v))


def _power(exponent: float) -> str:
    """10 ** exponent as a tick label: 0.01, 1, 100 (two significant digits between decades)."""
    return f"{10 ** exponent:g}" if float(exponent).is_integer() else f"{10 ** exponent:.2g}"


def _colour_bar(canvas: Image.Image, box: tuple[int, int, int, int], scale: tuple[float, float], colours,
                label: str, tick_text) -> None:
    """A horizontal colour bar over the log10 values `scale`, ticked at whole decades (or finer when short)."""
    (left, top, right, bottom), (low, high) = box, scale
    ramp = colours(np.linspace(0.0, 1.0, right - left)[None, :])  # (1, width, 3)
    canvas.paste(Image.fromarray(np.repeat(ramp, bottom - top, axis=0)), (left, top))
    pen = ImageDraw.Draw(canvas)
    pen.rectangle(box, outline=INK)
    pen.text((left, top - 4), label, fill=INK, font=font(12), anchor="ls")
    ticks = [float(v) for v in range(math.ceil(low), math.floor(high) + 1)]
    if len(ticks) < 2:
        ticks = [v for v in nice_ticks(low, high, 4) if low <= v <= high]
    for v in ticks:
        x = left + (v - low) / (high - low) * (right - left)
        pen.line([(x, bottom), (x, bottom + 4)], fill=INK)
        pen.text((x, bottom + 6), tick_text(v), fill=INK, font=font(11), anchor="mt")


def source_frames(source: str, stored_frames: int, used: np.ndarray, size: int,
                  window: int | None) -> np.ndarray | None:
    """The frames the features came from (chosen as the store chose them), when the source video can still be read."""
    if "://" in source or not Path(source).is_file():
        return None
    try:
        clip = decode_clip(source, frames=stored_frames, size=size, window=window)
    except DecodeError as err:
        log.info("attention picture without frames: %s", err)
        return None
    return clip[used]


def store_window(store: FeatureStore) -> tuple[int, int | None]:
    """The frame size and the window (frames from the start; None: spread over the video) the store was made with."""
    sampling = store.attributes.sampling
    return store.attributes.frame_size or FRAME_SIZE, sampling.window_frames if sampling.mode == "window" else None


@torch.no_grad()
def save_attention_pictures(model: EfficientFoveatedModel, store_path: str, rows: list[int], frames: int,
                            out_dir: Path, prefix: str, device: torch.device) -> list[Path]:
    """Draw the attention of `rows` (held-out videos) and save one PNG per video; returns the paths."""
    store = FeatureStore.open(store_path)
    used = frame_indices(store.shapes.frames, frames)
    ids = store.read_column("video_id")
    sources = store.read_column("source")
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_size, window = store_window(store)
    paths = []
    was_training = model.training
    model.eval()
    for row in rows:
        features = torch.from_numpy(store.read_features(row)[used])  # (T, N, D)
        maps = model.attention_maps(features[None].to(device))
        arrays = {name: m[0].float().cpu().numpy() for name, m in maps.items()}
        frames_shown = source_frames(str(sources[row]), store.shapes.frames, used, frame_size, window)
        picture = draw_attention(arrays, frames_shown, title=f"{ids[row]}: where the static (coarse) and the "
                                                             f"foveated (fine) query look")
        path = out_dir / f"{prefix}-{_safe(str(ids[row]))}.png"
        path.write_bytes(png_bytes(picture))
        paths.append(path)
    model.train(was_training)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
