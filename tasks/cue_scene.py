"""The demo's videos: a positive control for the foveation gain, and its negative control.

What the ratio exists to measure is whether a query formed after seeing the previous frame predicts the next
frame better than one static query. These videos are built so that it does, and by how much is known:

- Four look-alike square patches (the "slots", 3 x 3 DINO patches each) sit at fixed places on a flat background.
  Their colours are drawn afresh at every state of the video.
- A one-patch-wide striped border frames the picture; its stripe pattern (one of four, fixed per video) is the
  cue: it names one slot.
- The background of the next state takes the colour that the named slot has now.

A static query cannot single out the named slot (it changes from video to video, and the four look alike), so
the best it can do for the next frame's background is the mean colour of the four slots. A query made after the
previous frame has seen the border can look at the named slot and read the colour itself. The latents of the
next frame are mostly background, so loss_fine can fall well below loss_coarse.

Negative control (`control="none"`): the same videos, except that the next background takes a new colour that
no part of the frame shows, so the border cues nothing. Neither a static nor a foveated query can predict it:
loss_fine and loss_coarse should end equal (ratio 1).

Why not a control whose background follows a slot drawn at random at every state: there the best any query can
do is to look at the four slots at once (their mean colour), which a static query does easily and a foveated
one, whose queries vary from frame to frame, does worse. Measured with the demo's pipeline: ratio 0.95 (126
videos) and 0.97 (318 videos) after 600 steps. A ratio below 1 can mean that diffuse attention is what the data
rewards, not that the measurement is broken.

States change exactly between the frames training sees. The store keeps 24 of the first 72 frames
(`tasks.decode.window_indices`), training takes 16 of those 24 (`storage.loader.frame_indices`): video frames
0, 3, 9, 12, 18, ... 71. State j is shown from the j-th of these frames to the frame before the next one, so
that consecutive training frames are consecutive states. After the window the states go on every third frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

Control = Literal["cue", "none"]

TOKEN_GRID = 18  # DINO patches per side of a 256 px frame (patch 14, the last 4 px unused)
SLOTS = ((3, 3), (3, 12), (12, 3), (12, 12))  # (row, col) of each slot's top-left patch
SLOT_PATCHES = 3  # a slot is 3 x 3 DINO patches (2 x 2 slots were found by the fine query hundreds of steps later)
SLOT_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")
CUE_NAMES = ("horizontal stripes", "vertical stripes", "checks", "diagonal stripes")
SIZE = 128  # pixels per side: 7 per DINO patch once the decoder scales it to 256
PATCH = SIZE * 14 // 256


def training_frames(window: int = 72, stored: int = 24, frames: int = 16) -> np.ndarray:
    """Video frame indices of the frames training sees: [0, 3, 9, 12, 18, 21, 27, 30, 37, ..., 64, 71]."""
    from storage.loader import frame_indices
    from tasks.decode import window_indices

    return window_indices(window, stored)[frame_indices(stored, frames)]


@functools.cache
def cue_texture(kind: int, size: int) -> np.ndarray:
    """One of four black-and-white stripe patterns, 2 px wide: (size, size) in {0, 255}."""
    y, x = np.mgrid[0:size, 0:size] // 2
    pattern = (y % 2, x % 2, (x + y) % 2, ((x + y) // 2) % 2)[kind]
    return (255 * pattern).astype(np.uint8)


def border_mask() -> np.ndarray:
    """(SIZE, SIZE) bool: the outer ring of DINO patches (and the pixels past the last patch)."""
    mask = np.zeros((SIZE, SIZE), bool)
    edge = (TOKEN_GRID - 1) * PATCH
    mask[:PATCH], mask[edge:], mask[:, :PATCH], mask[:, edge:] = True, True, True, True
    return mask


BORDER = border_mask()


@dataclass
class CueScene:
    """One video's colours: slot colours per state, the background of each state, the cue, the named slot."""

    slot_colours: np.ndarray  # (states, 4, 3) uint8
    backgrounds: np.ndarray  # (states, 3) uint8: state s > 0 takes the colour of slot followed[s] at state s-1
    followed: np.ndarray  # (states,) int: the slot whose colour the background of each state took (-1: none)
    cue: int  # the border's pattern
    control: Control

    @classmethod
    def draw(cls, seed: int, states: int, control: Control = "cue") -> "CueScene":
        rng = np.random.default_rng(seed)
        cue = int(rng.integers(len(SLOTS)))
        slot_colours = rng.integers(16, 240, size=(states, len(SLOTS), 3)).astype(np.uint8)
        backgrounds = rng.integers(16, 240, size=(states, 3)).astype(np.uint8)  # the control's: seen nowhere before
        followed = np.full(states, -1 if control == "none" else cue)
        followed[0] = -1
        if control == "cue":
            backgrounds[1:] = slot_colours[:-1, cue]
        return cls(slot_colours, backgrounds, followed, cue, control)

    def frame(self, state: int) -> np.ndarray:
        """The picture of one state: (SIZE, SIZE, 3) uint8, upright."""
        picture = np.empty((SIZE, SIZE, 3), np.uint8)
        picture[:] = self.backgrounds[state]
        picture[BORDER] = cue_texture(self.cue, SIZE)[BORDER][:, None]
        for (row, col), colour in zip(SLOTS, self.slot_colours[state]):
            picture[row * PATCH:(row + SLOT_PATCHES) * PATCH, col * PATCH:(col + SLOT_PATCHES) * PATCH] = colour
        return picture

    def caption(self) -> str:
        if self.control == "none":
            return (f"four colour patches in a border of {CUE_NAMES[self.cue]}; the background takes colours "
                    f"no patch had")
        return (f"four colour patches in a border of {CUE_NAMES[self.cue]}; the background takes the colour the "
                f"{SLOT_NAMES[self.cue]} patch had a moment before")


def state_of_frames(count: int) -> np.ndarray:
    """The state shown at each of `count` video frames: (count,) int, changing exactly at the training frames."""
    starts = training_frames()
    after = np.arange(starts[-1] + 3, max(count, starts[-1] + 3), 3)  # past the window: a new state every 3 frames
    starts = np.concatenate([starts, after])
    return np.searchsorted(starts, np.arange(count), side="right") - 1


def render_cue_video(seed: int, count: int, control: Control = "cue") -> tuple[CueScene, Iterator[np.ndarray]]:
    """The scene of one video and its `count` frames (each a new array)."""
    states = state_of_frames(count)
    scene = CueScene.draw(seed, int(states.max()) + 1, control)
    return scene, (scene.frame(int(s)) for s in states)
