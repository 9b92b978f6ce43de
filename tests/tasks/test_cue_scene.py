"""The demo's videos and demo encoders as a positive and a negative control, checked without any learning.

The model's query attention is run with planted queries: the position code of the named slot (the ideal fine
query) and the best static queries. What each one sees is read out linearly (least squares fitted on half the
videos, measured on the other half) to predict the next frame's background. With the cue, the planted fine query
reaches the ideal bound (a readout of the true colour of the named slot) while a static query stays far above it;
in the negative control, no query, planted at any slot or static, predicts anything.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from model.encoders import EncoderConfig, FrameEncoder, _tiny_dino_config, sincos_position_codes
from model.foveated import query_attention
from storage.loader import frame_indices
from tasks.cue_scene import SLOT_PATCHES, SLOTS, TOKEN_GRID, CueScene, state_of_frames, training_frames
from tasks.decode import read_clip
from tasks.samples import make_video

STATES = 16
VIDEOS = 48


def upscale(picture: np.ndarray) -> np.ndarray:
    """128 -> 256 px, bicubic, as the decoder scales the demo's videos."""
    return np.asarray(Image.fromarray(picture).resize((256, 256), Image.BICUBIC))


@pytest.fixture(scope="module")
def encoder():
    return FrameEncoder(EncoderConfig(preset="demo"))


def encode_scenes(encoder, control):
    """Scenes and their 16 states' features (V, 16, 325, 384) and latents (V, 16, 4, 32, 32) as float32."""
    scenes = [CueScene.draw(seed, STATES, control) for seed in range(VIDEOS)]
    frames = np.stack([upscale(scene.frame(s)) for scene in scenes for s in range(STATES)])
    features, latents = encoder.encode(frames)
    return (scenes, torch.from_numpy(features.astype(np.float32)).view(VIDEOS, STATES, 325, 384),
            latents.astype(np.float32).reshape(VIDEOS, STATES, 4, 32, 32))


def slot_tokens(slot: int) -> list[int]:
    row, col = SLOTS[slot]
    return [1 + (row + dr) * TOKEN_GRID + col + dc for dr in range(SLOT_PATCHES) for dc in range(SLOT_PATCHES)]


def slot_query(slot: int, scale: float = 6.0) -> torch.Tensor:
    """The ideal fine query: the mean position code of the slot's patches, scaled to a sharp softmax."""
    codes = sincos_position_codes(TOKEN_GRID, _tiny_dino_config().hidden_size)
    return scale * codes[[t - 1 for t in slot_tokens(slot)]].mean(0)


def attend(features, queries):
    """z (V, T, D) and attention (V, T, N) of per-video, per-frame queries (V, T, D) through the model's attention."""
    with torch.no_grad():
        z, weights = query_attention(queries, features)
    return z.numpy(), weights.numpy()


def readout_error(inputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error, on the second half of the videos, of a ridge readout fitted on the first half."""
    half = inputs.shape[0] // 2
    x = np.concatenate([inputs, np.ones((*inputs.shape[:2], 1))], -1)  # (V, T, F + 1)
    fit_x, fit_y = x[:half].reshape(-1, x.shape[-1]), targets[:half].reshape(-1, targets.shape[-1])
    weights = np.linalg.solve(fit_x.T @ fit_x + 1e-2 * np.eye(fit_x.shape[1]), fit_x.T @ fit_y)
    predicted = x[half:] @ weights
    return float(((predicted - targets[half:]) ** 2).mean())


def next_background(latents: np.ndarray) -> np.ndarray:
    """The latent colour of the middle of the next frame (background only): (V, T-1, 4)."""
    return latents[:, 1:, :, 12:20, 12:20].mean(axis=(-1, -2))


def losses(encoder, control):
    """Readout errors of the ideal bound, the planted fine query and the best static query, and the variance."""
    scenes, features, latents = encode_scenes(encoder, control)
    now, target = features[:, :-1], next_background(latents)  # frame t's tokens predict frame t+1's background
    named = torch.stack([slot_query(scene.cue) for scene in scenes])[:, None].expand(-1, STATES - 1, -1)
    z_fine, weights = attend(now, named)
    # Static queries: uniform attention, and the four slots together at a few sharpnesses (a sharp one ends up on
    # one slot or another by colour; a soft one sees the mean of the four, the best a static query can do).
    static = [torch.zeros(VIDEOS, STATES - 1, 384)]
    static += [sum(slot_query(k, scale) for k in range(len(SLOTS))).expand(VIDEOS, STATES - 1, -1) / len(SLOTS)
               for scale in (0.5, 1.0, 2.0)]
    coarse = min(readout_error(attend(now, q)[0], target) for q in static)
    every_slot = [readout_error(attend(now, slot_query(k).expand(VIDEOS, STATES - 1, -1))[0], target)
                  for k in range(len(SLOTS))]
    truth = np.stack([scene.slot_colours[:-1, scene.cue] for scene in scenes]).astype(np.float64)  # (V, T-1, 3)
    mass = np.mean([weights[v][:, slot_tokens(scene.cue)].sum(-1).mean() for v, scene in enumerate(scenes)])
    return {"ideal": readout_error(truth, target), "fine": readout_error(z_fine, target), "coarse": coarse,
            "best_single_slot": min(every_slot), "variance": float(target[VIDEOS // 2:].var(axis=(0, 1)).mean()),
            "mass": float(mass)}


def test_with_the_cue_a_planted_fine_query_reaches_the_ideal_bound(encoder):
    result = losses(encoder, "cue")
    assert result["mass"] > 0.8  # the position codes let one query single out a slot: "where" survives the encoder
    assert result["ideal"] < 0.05 * result["variance"]  # the stand-in VAE keeps colour: the named slot tells all
    assert result["fine"] < result["ideal"] + 0.05 * result["variance"]
    assert result["coarse"] > 0.6 * result["variance"]  # a static query sees the four slots mixed (at best 1/4)
    assert result["coarse"] > 5 * result["fine"]


def test_in_the_negative_control_no_query_predicts_the_next_background(encoder):
    result = losses(encoder, "none")
    assert result["mass"] > 0.8  # the query still looks where it is told: there is nothing there to find
    for what in ("ideal", "fine", "best_single_slot", "coarse"):
        assert result[what] > 0.9 * result["variance"], what


def test_the_next_background_follows_the_named_slot_only_with_the_cue():
    cue = CueScene.draw(3, STATES, "cue")
    np.testing.assert_array_equal(cue.backgrounds[1:], cue.slot_colours[:-1, cue.cue])
    none = CueScene.draw(3, STATES, "none")
    np.testing.assert_array_equal(none.slot_colours, cue.slot_colours)  # the same videos otherwise
    assert none.cue == cue.cue and (none.followed == -1).all()
    shown_before = none.slot_colours[:-1].astype(int)  # (T-1, 4, 3)
    closest = np.abs(shown_before - none.backgrounds[1:, None].astype(int)).max(-1).min(-1)  # (T-1,)
    assert np.median(closest) > 40  # no patch of the frame before had the next background's colour


def test_states_change_exactly_at_the_frames_training_sees():
    seen = training_frames()
    assert seen.tolist() == [0, 3, 9, 12, 18, 21, 27, 30, 37, 40, 46, 49, 55, 58, 64, 71]
    states = state_of_frames(200)
    assert states[seen].tolist() == list(range(16))
    assert states[1:3].tolist() == [0, 0] and states[4:9].tolist() == [1] * 5  # held between them
    assert states[72] == 15 and states[74] == 16 and states[-1] > 16  # a new state every third frame after


def test_a_cue_video_through_the_codec_and_the_window_shows_its_states(tmp_path):
    """Encoded by ffmpeg, decoded with the seed's window: the 16 frames training takes are the 16 states."""
    video = make_video(tmp_path / "cue.webm", 30, fps=5, size=(128, 128), pattern="cue", seed=11)
    frames = read_clip(video).frames[frame_indices(24, 16)].astype(float)  # (16, 256, 256, 3)
    scene = CueScene.draw(11, int(state_of_frames(150).max()) + 1, "cue")
    background = frames[:, 120:136, 120:136].mean(axis=(1, 2))  # (16, 3) the middle of the frame
    np.testing.assert_allclose(background, scene.backgrounds[:16], atol=12)  # VP9 at crf 32: a few levels off
    row, col = SLOTS[scene.cue]
    inside = frames[:, row * 14 + 7:(row + SLOT_PATCHES) * 14 - 7, col * 14 + 7:(col + SLOT_PATCHES) * 14 - 7]
    inside = inside.mean(axis=(1, 2))
    np.testing.assert_allclose(inside, scene.slot_colours[:16, scene.cue], atol=12)
