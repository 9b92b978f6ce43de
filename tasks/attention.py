"""Attention pictures: where the coarse (static) and the fine query look, frame by frame.

The seed's "visualize attention: see if queries focus on different regions". For a few held-out videos, the
attention of each query over the 18 x 18 patch tokens is drawn over the decoded frame (or alone when the source
video cannot be read), one row for the coarse pass and one for the last fine pass.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.encoder_config import FRAME_SIZE
from model.foveated import EfficientFoveatedModel
from storage.loader import frame_indices
from storage.store import FeatureStore
from tasks.decode import DecodeError, decode_clip

log = logging.getLogger(__name__)

# A perceptually ordered dark-to-bright ramp (black, purple, red, orange, pale yellow).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours along the ramp."""
    position = np.clip(heat, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def patch_grid(weights: np.ndarray) -> np.ndarray:
    """(N,) attention over CLS + patches -> (g, g) over the patches, scaled to [0, 1] for display."""
    patches = weights[1:]
    side = int(math.isqrt(patches.size))
    grid = patches[: side * side].reshape(side, side)
    top = grid.max()
    return grid / top if top > 0 else grid


def draw_tile(weights: np.ndarray, frame: np.ndarray | None, size: int) -> Image.Image:
    """One frame's attention: the heat map over the frame where the query looks, or the heat map alone."""
    grid = Image.fromarray((patch_grid(weights) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    heat = np.asarray(grid, dtype=np.float32)[..., None] / 255.0  # (size, size, 1) in [0, 1]
    colours = colorize(heat[..., 0]).astype(np.float32)
    if frame is None:
        return Image.fromarray(colours.astype(np.uint8))
    base = np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR), dtype=np.float32)
    alpha = 0.75 * heat  # the frame stays visible where the query does not look
    return Image.fromarray((base * (1 - alpha) + colours * alpha).astype(np.uint8))


def draw_attention(maps: dict[str, np.ndarray], frames: np.ndarray | None, title: str, tile: int = 96) -> Image.Image:
    """A grid: one row per pass ('coarse', 'fine'), one column per frame. maps[name] is (T, N)."""
    names = list(maps)
    T = maps[names[0]].shape[0]
    label_w, header = 56, 18
    canvas = Image.new("RGB", (label_w + T * tile, header + len(names) * tile), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((4, 3), title, fill=(0, 0, 0))
    for r, name in enumerate(names):
        y = header + r * tile
        pen.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0))
        for t in range(T):
            frame = frames[t] if frames is not None else None
            canvas.paste(draw_tile(maps[name][t], frame, tile), (label_w + t * tile, y))
    return canvas


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


@torch.no_grad()
def save_attention_pictures(model: EfficientFoveatedModel, store_path: str, rows: list[int], frames: int,
                            out_dir: Path, prefix: str, device: torch.device) -> list[Path]:
    """Draw the attention of `rows` (held-out videos) and save one PNG per video; returns the paths."""
    store = FeatureStore.open(store_path)
    used = frame_indices(store.shapes.frames, frames)
    ids = store.read_column("video_id")
    sources = store.read_column("source")
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_size = store.attributes.frame_size or FRAME_SIZE
    sampling = store.attributes.sampling
    window = sampling.window_frames if sampling.mode == "window" else None
    paths = []
    was_training = model.training
    model.eval()
    for row in rows:
        features = torch.from_numpy(store.read_features(row)[used])  # (T, N, D)
        maps = model.attention_maps(features[None].to(device))
        arrays = {name: m[0].float().cpu().numpy() for name, m in maps.items()}
        frames_shown = source_frames(str(sources[row]), store.shapes.frames, used, frame_size, window)
        picture = draw_attention(arrays, frames_shown,
                                 title=f"{ids[row]}  (top: static query; bottom: foveated query)")
        path = out_dir / f"{prefix}-{_safe(str(ids[row]))}.png"
        picture.save(path)
        paths.append(path)
    model.train(was_training)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
