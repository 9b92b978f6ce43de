"""Frame encoders: DINOv2 patch features and SD-VAE latents for batches of 256 x 256 RGB frames.

`full` loads the real models (hub ids or local folders, for offline clusters); `demo` builds tiny randomly
initialised models from configs, with the same output shapes (325 x 384 features, 4 x 32 x 32 latents), from a
fixed seed so that two runs produce the same store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_DINO_ID = "demo:tiny-dinov2"
DEMO_VAE_ID = "demo:tiny-sd-vae"


class EncoderLoadError(RuntimeError):
    """An encoder could not be loaded; the message names the setting to change."""


class EncoderConfig(BaseModel):
    """Which DINOv2 and VAE to run, and how."""

    preset: Literal["demo", "full"] = Field("full", description="demo: tiny random encoders; full: real weights")
    dino: str = Field("facebook/dinov2-small", description="DINOv2 hub id or local folder (full preset)")
    dino_revision: str | None = Field(None, description="hub revision (commit or tag) of the DINOv2 weights")
    vae: str = Field("stabilityai/sd-vae-ft-mse", description="SD-VAE hub id or local folder (full preset)")
    vae_revision: str | None = Field(None, description="hub revision of the VAE weights")
    frame_size: int = Field(256, ge=14, description="frames are square, this many pixels a side")
    batch_frames: int | None = Field(
        None, ge=1, description="frames per encoder call; None: 384 on a GPU (frames of many videos at once), "
                                "32 on a CPU (larger batches spill out of the CPU caches and run slower)")
    half_precision: bool = Field(True, description="run the encoders in float16 on a GPU")
    seed: int = Field(0, description="seed of the demo encoders' random weights")

    @classmethod
    def preset_config(cls, name: Literal["demo", "full"], **overrides: Any) -> "EncoderConfig":
        return cls(preset=name, **overrides)

    @property
    def dino_id(self) -> str:
        return DEMO_DINO_ID if self.preset == "demo" else self.dino

    @property
    def vae_id(self) -> str:
        return DEMO_VAE_ID if self.preset == "demo" else self.vae


def _tiny_dino_config():
    from transformers import Dinov2Config

    # hidden 384 and patch 14 give DINOv2-small's output shape; image_size 252 = 18 patches of 14, so a
    # 256 px frame needs no position-embedding interpolation. No transformer layer: the tokens are the patch
    # embedding plus the position embedding, layer-normed. They stand in for features a GPU would compute, so
    # they should cost the CPU little (the demo, the tests) and say what and where, as DINOv2's do.
    return Dinov2Config(
        hidden_size=384, num_hidden_layers=0, num_attention_heads=6, mlp_ratio=1, patch_size=14, image_size=252,
    )


# Random position embeddings at the usual init (std 0.02) are ~25x weaker than random patch embeddings, so a
# probe recovers a patch's position from its token with R^2 ~0.2; at std ~0.5 it is ~0.97, as with DINOv2.
DEMO_POSITION_SCALE = 25.0


def _tiny_vae_config() -> dict[str, Any]:
    # Four blocks = three 2x downsamplings: 256 -> 32, like SD-VAE, with a handful of channels.
    return dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=0,  # downsampling convs only: 0.07 s instead of 0.3 s of CPU per video
        latent_channels=4,
        norm_num_groups=2,
        sample_size=256,
        mid_block_add_attention=False,
        scaling_factor=0.18215,
    )


def describe_encoders(config: EncoderConfig) -> dict[str, Any]:
    """What a store records about its encoders (training checks these), read from configs, not weights."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config

    if config.preset == "demo":
        dino, vae = _tiny_dino_config().to_dict(), _tiny_vae_config()
    else:
        try:
            dino = Dinov2Config.from_pretrained(config.dino, revision=config.dino_revision).to_dict()
            vae = dict(AutoencoderKL.load_config(config.vae, revision=config.vae_revision))
        except (OSError, ValueError) as err:
            raise EncoderLoadError(f"cannot read the encoder configs of {config.dino!r} / {config.vae!r} "
                                   f"(set EncoderConfig.dino / .vae to hub ids or local folders): {err}") from err
    demo = config.preset == "demo"
    latent_size = config.frame_size // 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "encoder_preset": config.preset,
        "dino": {"id": config.dino_id, "revision": None if demo else config.dino_revision,
                 "seed": config.seed if demo else None,
                 "tokens": (config.frame_size // dino["patch_size"]) ** 2 + 1, "dim": dino["hidden_size"],
                 "normalize": "imagenet"},
        "vae": {"id": config.vae_id, "revision": None if demo else config.vae_revision,
                "seed": config.seed if demo else None,
                "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
                "output": "latent_dist.mean * scaling_factor",
                "latent_shape": [vae["latent_channels"], latent_size, latent_size]},
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
            from diffusers import AutoencoderKL
            from transformers import Dinov2Model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                dino, vae = Dinov2Model(_tiny_dino_config()), AutoencoderKL(**_tiny_vae_config())
                with torch.no_grad():
                    dino.embeddings.position_embeddings.mul_(DEMO_POSITION_SCALE)
        else:
            dino = _load_pretrained("DINOv2", config.dino, config.dino_revision, "--dino / EncoderConfig.dino")
            vae = _load_pretrained("SD-VAE", config.vae, config.vae_revision, "--vae / EncoderConfig.vae")
        # channels_last is several times faster for the VAE's convolutions on CPUs and tensor cores alike.
        self.dino = dino.eval().requires_grad_(False).to(self.device)
        self.vae = vae.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        # Weights may be stored in any precision; compute in float16 on a GPU, float32 on a CPU.
        if self.dino.dtype != self.dtype:
            self.dino = self.dino.to(dtype=self.dtype)
        if self.vae.dtype != self.dtype:
            self.vae = self.vae.to(dtype=self.dtype)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.tokens = (config.frame_size // self.dino.config.patch_size) ** 2 + 1
        self.feature_dim = int(self.dino.config.hidden_size)
        self.latent_channels = int(self.vae.config.latent_channels)
        downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_size = config.frame_size // downsampling
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._mean, self._std = mean, std

    def describe(self) -> dict[str, Any]:
        return describe_encoders(self.config)

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
        latents = self.vae.encode(vae_in).latent_dist.mean * self.scaling_factor  # (b, 4, 32, 32)
        return features, latents
