import numpy as np
import pytest
import torch
from PIL import Image

from storage.loader import frame_indices
from storage.store import FeatureStore
from tasks.attention import (
    DIFF_ROW,
    AttentionLayout,
    colorize,
    draw_attention,
    patch_grid,
    save_attention_pictures,
    source_frames,
)
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
    layout = AttentionLayout(frames=4, rows=("coarse", "fine", DIFF_ROW), tile=32)
    assert over.shape == alone.shape == (layout.size[1], layout.size[0], 3)
    assert np.abs(tiles(over, layout, 0) - tiles(alone, layout, 0)).mean() > 5  # the frame shows through
    assert np.array_equal(tiles(over, layout, 2), tiles(alone, layout, 2))  # the difference row has no frame


def test_pictures_for_held_out_videos_are_saved(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", videos=8)
    config = tiny_config()
    model = build_model(config.model, seed=0)
    paths = save_attention_pictures(model, store, [1, 3], config.loader.frames, tmp_path / "pictures", "chunk-001",
                                    torch.device("cpu"))
    ids = FeatureStore.open(store).read_column("video_id")
    assert [p.name for p in paths] == [f"chunk-001-{ids[1]}.png", f"chunk-001-{ids[3]}.png"]
    image = Image.open(paths[0])
    layout = AttentionLayout(frames=16, rows=("coarse", "fine", DIFF_ROW))
    assert image.size == layout.size and layout.bands == 4  # 16 frames in 4 bands of 4, three rows per band
    assert layout.box(2, 15)[3] < image.height and paths[0].stat().st_size < 250_000
    assert model.training  # left as it was found


def tiles(picture, layout: AttentionLayout, row: int) -> np.ndarray:
    """The pixels of one row's tiles, frame by frame: (T, tile, tile, 3)."""
    pixels = np.asarray(picture).astype(int)
    return np.stack([pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in (layout.box(row, t) for t in range(layout.frames))])


def peaked(frames: int, patch: int) -> np.ndarray:
    """Attention with most of its weight on one patch (+1: after CLS), the rest spread evenly."""
    maps = np.full((frames, 325), 0.2 / 324)
    maps[:, 1 + patch] += 0.8
    return maps


def test_coarse_and_fine_rows_differ_where_the_queries_do_and_the_difference_row_shows_it():
    layout = AttentionLayout(frames=8, rows=("coarse", "fine", DIFF_ROW), tile=72)
    coarse, fine = peaked(8, 0), peaked(8, 18 * 17 + 17)  # top-left against bottom-right patch
    picture = draw_attention({"coarse": coarse, "fine": fine}, None, "t", tile=72)
    assert picture.size == layout.size and layout.bands == 2
    assert np.abs(tiles(picture, layout, 0) - tiles(picture, layout, 1)).mean() > 1
    diff = tiles(picture, layout, 2)[:, 1:-1, 1:-1]  # inside the tile's outline; a patch is 72 / 18 = 4 px
    red, blue = diff[:, -3:, -3:].mean((0, 1, 2)), diff[:, :3, :3].mean((0, 1, 2))
    assert red[0] > red[2] + 60 and blue[2] > blue[0] + 60  # fine looks bottom right (red), coarse top left (blue)


def test_equal_maps_give_equal_rows_and_a_neutral_difference_row():
    """The negative control of the test above: the same attention twice."""
    layout = AttentionLayout(frames=8, rows=("coarse", "fine", DIFF_ROW), tile=72)
    same = peaked(8, 40)
    picture = draw_attention({"coarse": same, "fine": same.copy()}, None, "t", tile=72)
    assert np.array_equal(tiles(picture, layout, 0), tiles(picture, layout, 1))
    diff = tiles(picture, layout, 2)[:, 1:-1, 1:-1]
    assert (np.abs(diff - 247) <= 1).all()  # the diverging map's white everywhere


def test_the_colour_bars_sit_under_the_tiles_and_span_their_ramps():
    layout = AttentionLayout(frames=4, rows=("coarse", "fine", DIFF_ROW), tile=48)
    picture = np.asarray(draw_attention({"coarse": peaked(4, 0), "fine": peaked(4, 5)}, None, "t", tile=48))
    bar_row = picture[picture.shape[0] - layout.bars + 31]  # the middle of the bars
    assert bar_row[30].sum() < 60  # the attention ramp starts near black ...
    assert bar_row[20 + (picture.shape[1] - 72) // 2].sum() > 600  # ... and ends pale yellow
    assert layout.box(2, 3)[3] < picture.shape[0] - layout.bars
