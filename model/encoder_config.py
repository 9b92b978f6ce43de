"""Which frame encoders a precompute runs (EncoderConfig), apart from the encoders themselves so that reading it
(the command line's help, a flow's parameters) does not import torch."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from model.presets import Presets, PresetName, PresetTable

FULL_DINO_ID = "facebook/dinov2-small"
FULL_VAE_ID = "stabilityai/sd-vae-ft-mse"
DEMO_DINO_ID = "demo:sincos-dinov2"
DEMO_VAE_ID = "demo:colour-vae"
FRAME_SIZE = 256  # DINOv2-small's 18 x 18 patches of 14 px (325 tokens) and SD-VAE's 32 x 32 latents


class EncoderConfig(Presets, BaseModel):
    """Which DINOv2 and VAE to run, and how. Presets: `full` the weights named below, `demo` tiny stand-ins."""

    PRESETS: ClassVar[PresetTable] = {"full": {}, "demo": {}}  # the preset field alone picks the encoders

    preset: PresetName = Field("full", description="demo: tiny random encoders; full: real weights")
    dino: str = Field(FULL_DINO_ID, description="DINOv2 hub id or local folder (full preset)")
    dino_revision: str | None = Field(None, description="hub revision (commit or tag) of the DINOv2 weights")
    vae: str = Field(FULL_VAE_ID, description="SD-VAE hub id or local folder (full preset)")
    vae_revision: str | None = Field(None, description="hub revision of the VAE weights")
    frame_size: int = Field(FRAME_SIZE, ge=14, description="frames are square, this many pixels a side (the decoder "
                                                           "crops to it: precompute refuses a different decode.size)")
    batch_frames: int | None = Field(
        None, ge=1, description="frames per encoder call; None: 384 on a GPU (frames of many videos at once), "
                                "32 on a CPU (larger batches spill out of the CPU caches and run slower)")
    half_precision: bool = Field(True, description="run the encoders in float16 on a GPU")
    seed: int = Field(0, description="seed of the demo encoders' random weights")

    @property
    def dino_id(self) -> str:
        return DEMO_DINO_ID if self.preset == "demo" else self.dino

    @property
    def vae_id(self) -> str:
        return DEMO_VAE_ID if self.preset == "demo" else self.vae
