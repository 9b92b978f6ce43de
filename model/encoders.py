"""Frame encoders: DINOv2 patch features and SD-VAE latents for batches of 256 x 256 RGB frames.

`full` loads the real models (hub ids or local folders, for offline clusters); `demo` builds stand-ins with the
same output shapes (325 x 384 features, 4 x 32 x 32 latents) that cost a CPU little and keep what the demo's
experiment needs, "where" and colour, from a fixed seed so that two runs produce the same store:
- DINOv2 stand-in: transformers' Dinov2Model with no transformer layer, i.e. a seeded random patch embedding plus a
  smooth 2-D sin-cos position code per patch, layer-normed. A query that matches the code of a place attends
  there, as a fine query must in the demo.
- SD-VAE stand-in: each latent pixel is a fixed mix of the mean colour of its 8 x 8 pixels, at about unit scale.
  The tiny random AutoencoderKL used before ended in a GroupNorm, which removes a frame's overall colour: exactly
  what the demo's next frame depends on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.encoder_config import DEMO_DINO_ID, DEMO_VAE_ID, EncoderConfig  # noqa: F401 (EncoderConfig: re-exported)
from storage.attrs import VAE_SCALING_FACTOR

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderLoadError(RuntimeError):
    """An encoder could not be loaded; the message names the setting to change."""


def _tiny_dino_config():
    from transformers import Dinov2Config

    # hidden 384 and patch 14 give DINOv2-small's output shape; image_size 252 = 18 patches of 14, so a
    # 256 px frame needs no position-embedding interpolation. No transformer layer: the tokens are the patch
    # embedding plus the position embedding, layer-normed. They stand in for features a GPU would compute, so
    # they should cost the CPU little (the demo, the tests) and say what and where, as DINOv2's do.
    return Dinov2Config(
        hidden_size=384, num_hidden_layers=0, num_attention_heads=6, mlp_ratio=1, patch_size=14, image_size=252,
    )


# Each sin/cos entry is +-2: the position code of a patch is then about as long as the embedding of its colour
# (the random patch embedding of a flat colour), so after the layer norm a token says both where and what.
DEMO_POSITION_SCALE = 2.0


def sincos_position_codes(grid: int, dim: int, scale: float = DEMO_POSITION_SCALE) -> torch.Tensor:
    """2-D sin-cos codes of a grid x grid patch grid, row-major: (grid * grid, dim).

    Half the dims code the row, half the column, each as sin and cos at dim / 4 frequencies whose periods run
    geometrically from 3 to 2.5 * grid patches: neighbouring patches have similar codes (smooth), and the dot
    product of two codes peaks where they are the same patch, so one query vector can single out a place.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    periods = np.geomspace(3.0, 2.5 * grid, dim // 4)
    angles = np.arange(grid)[:, None] * (2 * np.pi / periods)[None, :]  # (grid, dim / 4)
    axis = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (grid, dim / 2)
    rows, cols = np.repeat(axis, grid, axis=0), np.tile(axis, (grid, 1))  # (grid * grid, dim / 2) each
    return torch.tensor(scale * np.concatenate([rows, cols], axis=1), dtype=torch.float32)


def build_demo_dino(seed: int) -> torch.nn.Module:
    """The DINOv2 stand-in: a seeded random patch embedding, sin-cos position codes, no transformer layer."""
    from transformers import Dinov2Model

    config = _tiny_dino_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dino = Dinov2Model(config)
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        dino.embeddings.position_embeddings[0, 0] = 0.0  # the CLS token has no place
        dino.embeddings.position_embeddings[0, 1:] = sincos_position_codes(grid, config.hidden_size, DEMO_POSITION_SCALE)
    return dino


class LatentEncoder(torch.nn.Module):
    """What the store needs of a VAE: frames in [-1, 1] (b, 3, S, S) -> latents (b, C, S / downsampling, ...)."""

    latent_channels: int
    downsampling: int
    scaling_factor: float


class SDVAELatents(LatentEncoder):
    """An AutoencoderKL's posterior mean times its scaling factor (SD-VAE: VAE_SCALING_FACTOR), as the seed stores it."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.latent_channels = int(vae.config.latent_channels)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor


# Luma, red-green, yellow-blue and red-cyan axes of RGB in [-1, 1], times 1.7: latents of about unit scale.
DEMO_COLOUR_MIX = 1.7 * np.array([[0.577, 0.577, 0.577], [0.707, -0.707, 0.0], [0.408, 0.408, -0.816],
                                  [0.5, -0.25, -0.25]])


class ColourLatents(LatentEncoder):
    """The SD-VAE stand-in: each latent pixel is a fixed mix of the mean colour of its 8 x 8 pixels."""

    latent_channels, downsampling, scaling_factor = 4, 8, 1.0

    def __init__(self):
        super().__init__()
        self.register_buffer("mix", torch.tensor(DEMO_COLOUR_MIX, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x, self.downsampling)  # (b, 3, S / 8, S / 8)
        return torch.einsum("oc,bchw->bohw", self.mix.to(x.dtype), pooled)  # (b, 4, S / 8, S / 8)


def describe_encoders(config: EncoderConfig) -> dict[str, Any]:
    """What a store records about its encoders (training checks these), read from configs, not weights."""
    if config.preset == "demo":
        return _describe_demo_encoders(config)
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config

    try:
        dino = Dinov2Config.from_pretrained(config.dino, revision=config.dino_revision).to_dict()
        vae = dict(AutoencoderKL.load_config(config.vae, revision=config.vae_revision))
    except (OSError, ValueError) as err:
        raise EncoderLoadError(f"cannot read the encoder configs of {config.dino!r} / {config.vae!r} "
                               f"(set EncoderConfig.dino / .vae to hub ids or local folders): {err}") from err
    latent_size = config.frame_size // 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "encoder_preset": config.preset,
        "dino": {"id": config.dino_id, "revision": config.dino_revision, "seed": None,
                 "tokens": (config.frame_size // dino["patch_size"]) ** 2 + 1, "dim": dino["hidden_size"],
                 "normalize": "imagenet"},
        "vae": {"id": config.vae_id, "revision": config.vae_revision, "seed": None,
                "scaling_factor": float(vae.get("scaling_factor", VAE_SCALING_FACTOR)),
                "output": "latent_dist.mean * scaling_factor",
                "latent_shape": [vae["latent_channels"], latent_size, latent_size]},
    }


def _describe_demo_encoders(config: EncoderConfig) -> dict[str, Any]:
    dino = _tiny_dino_config()
    latent_size = config.frame_size // ColourLatents.downsampling
    return {
        "encoder_preset": "demo",
        "dino": {"id": DEMO_DINO_ID, "revision": None, "seed": config.seed,
                 "tokens": (config.frame_size // dino.patch_size) ** 2 + 1, "dim": dino.hidden_size,
                 "normalize": "imagenet", "positions": f"2-D sin-cos, x {DEMO_POSITION_SCALE:g}"},
        "vae": {"id": DEMO_VAE_ID, "revision": None, "seed": None,
                "scaling_factor": ColourLatents.scaling_factor,
                "output": "fixed colour mix of the mean of each 8 x 8 block (model.encoders.ColourLatents)",
                "latent_shape": [ColourLatents.latent_channels, latent_size, latent_size]},
    }


def _load_pretrained(kind: str, source: str, revision: str | None, setting: str) -> torch.nn.Module:
    """from_pretrained of a hub id or a local folder, with an error that says which setting to change."""
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
        raise EncoderLoadError(f"{kind} folder {source} does not exist (set {setting})")
    try:
        if kind == "DINOv2":
            from transformers import Dinov2Model

            return Dinov2Model.from_pretrained(source, revision=revision)
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise EncoderLoadError(
            f"cannot load {kind} from {source!r} (set {setting} to a hub id or a local folder; "
            f"offline machines need the weights on disk): {err}"
        ) from err


class FrameEncoder:
    """DINOv2 + SD-VAE over uint8 frames, in batches, on one device."""

    def __init__(self, config: EncoderConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.dtype = torch.float16 if (self.device.type == "cuda" and config.half_precision) else torch.float32
        if config.preset == "demo":
            dino, vae = build_demo_dino(config.seed), ColourLatents()
        else:
            dino = _load_pretrained("DINOv2", config.dino, config.dino_revision, "--dino / EncoderConfig.dino")
            vae = SDVAELatents(
                _load_pretrained("SD-VAE", config.vae, config.vae_revision, "--vae / EncoderConfig.vae"))
        # channels_last is several times faster for the VAE's convolutions on CPUs and tensor cores alike.
        # Weights may be stored in any precision; compute in float16 on a GPU, float32 on a CPU.
        self.dino = dino.eval().requires_grad_(False).to(self.device, dtype=self.dtype)
        self.vae = vae.eval().requires_grad_(False).to(self.device, dtype=self.dtype,
                                                        memory_format=torch.channels_last)
        self.scaling_factor = self.vae.scaling_factor
        self.tokens = (config.frame_size // self.dino.config.patch_size) ** 2 + 1
        self.feature_dim = int(self.dino.config.hidden_size)
        self.latent_channels = self.vae.latent_channels
        self.latent_size = config.frame_size // self.vae.downsampling
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._mean, self._std = mean, std

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F, S, S, 3) uint8 -> features (F, 325, 384) and latents (F, 4, 32, 32), both float16 numpy."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] != frames.shape[2]:
            raise ValueError(f"frames must be (F, S, S, 3) uint8, got {frames.shape}")
        n = frames.shape[0]
        features = np.empty((n, self.tokens, self.feature_dim), dtype=np.float16)
        latents = np.empty((n, self.latent_channels, self.latent_size, self.latent_size), dtype=np.float16)
        step = self.config.batch_frames or (384 if self.device.type == "cuda" else 32)
        for start in range(0, n, step):
            batch = torch.from_numpy(frames[start:start + step]).to(self.device, non_blocking=True)
            x = batch.permute(0, 3, 1, 2).to(self.dtype).div_(255.0)  # (b, 3, S, S) in [0, 1]
            f, z = self._encode_batch(x)
            features[start:start + step] = f.to("cpu", torch.float16).numpy()
            latents[start:start + step] = z.to("cpu", torch.float16).numpy()
        return features, latents

    def _encode_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dino_in = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        features = self.dino(pixel_values=dino_in).last_hidden_state  # (b, 325, 384)
        vae_in = (x * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)  # VAE wants [-1, 1]
        latents = self.vae(vae_in)  # (b, 4, 32, 32)
        return features, latents
