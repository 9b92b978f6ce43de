import numpy as np
import pytest
import torch
from PIL import Image

from storage.loader import frame_indices
from storage.store import FeatureStore
from tasks.attention import colorize, draw_attention, patch_grid, save_attention_pictures, source_frames
from tasks.samples import make_video
from tasks.training import build_model
from tests.tasks.test_training import make_tiny_store, tiny_config


def test_patch_grid_drops_cls_and_scales_to_one():
    weights = np.zeros(325)
    weights[0] = 0.9  # CLS, not drawn
    weights[1 + 18 * 2 + 5] = 0.1  # patch at row 2, column 5
    grid = patch_grid(weights)
    assert grid.shape == (18, 18) and grid[2, 5] == 1.0 and grid.sum() == 1.0


def test_colorize_is_a_dark_to_bright_ramp():
    colours = colorize(np.array([[0.0, 0.5, 1.0]]))
    brightness = colours.astype(int).sum(-1)[0]
    assert colours.dtype == np.uint8 and brightness[0] < brightness[1] < brightness[2]


def test_frames_are_drawn_under_the_heat_map_when_the_video_is_readable(tmp_path):
    video = make_video(tmp_path / "clip.mp4", 4, fps=6, size=(160, 120), pattern="gradient")
    used = frame_indices(24, 4)
    frames = source_frames(str(video), 24, used, 64, window=72)
    assert frames.shape == (4, 64, 64, 3)
    assert source_frames(str(tmp_path / "gone.mp4"), 24, used, 64, window=72) is None
    assert source_frames("https://example.org/v.mp4", 24, used, 64, window=72) is None
    maps = {"coarse": np.full((4, 325), 1 / 325), "fine": np.eye(4, 325, k=1)}
    over = np.asarray(draw_attention(maps, frames, "t", tile=32))
    alone = np.asarray(draw_attention(maps, None, "t", tile=32))
    assert over.shape == alone.shape == (18 + 2 * 32, 56 + 4 * 32, 3)
    assert np.abs(over.astype(int) - alone.astype(int)).mean() > 5  # the frame shows through


def test_pictures_for_held_out_videos_are_saved(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", videos=8)
    config = tiny_config()
    model = build_model(config.model, seed=0)
    paths = save_attention_pictures(model, store, [1, 3], config.loader.frames, tmp_path / "pictures", "chunk-001",
                                    torch.device("cpu"))
    ids = FeatureStore.open(store).read_column("video_id")
    assert [p.name for p in paths] == [f"chunk-001-{ids[1]}.png", f"chunk-001-{ids[3]}.png"]
    image = Image.open(paths[0])
    assert image.size == (56 + 16 * 96, 18 + 2 * 96)  # 16 frames, coarse and fine rows
    assert model.training  # left as it was found
