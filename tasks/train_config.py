"""The training recipe: the seed's numbers (full) or a tiny model for a CPU (demo), and where metrics go."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from model.config import ModelConfig
from model.encoder_config import EncoderConfig
from model.presets import Presets, PresetName, PresetTable
from storage.loader import LoaderConfig


class WandbConfig(BaseModel):
    """Where metrics go besides the log."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when an API key is configured, else offline files in the run folder"
    )
    project: str = Field("foveated-vlm-efficient", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (team or user); None = the default")


class TrainConfig(Presets, BaseModel):
    """The seed recipe, plus what a resumable, timed chunk needs.

    Presets (`TrainConfig.for_preset`): `full` the seed recipe; `demo` a tiny model and a short schedule that a CPU
    runs in minutes.
    """

    PRESETS: ClassVar[PresetTable] = {
        "full": {"model": ModelConfig.for_preset("full")},
        "demo": {
            "model": ModelConfig.for_preset("demo"),
            # a fifth of the videos held out: with 1 in 20 the demo's ratio would rest on one or two videos
            "loader": LoaderConfig(batch_size=8, buffer_chunks=4, num_workers=0, eval_fraction=0.2),
            "lr": 1e-3, "warmup_steps": 20, "total_steps": 600, "log_every": 10, "checkpoint_every": 100,
            "max_minutes": 1.0, "eval_batches": 4,
        },
    }

    preset: PresetName = Field("full", description="model size and the encoders the store must have")
    model: ModelConfig = Field(default_factory=ModelConfig, description="EfficientFoveatedModel settings")
    loader: LoaderConfig = Field(default_factory=LoaderConfig, description="batches, frames, held-out rows")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(500, ge=0, description="linear warm-up steps")
    total_steps: int = Field(50_000, ge=1, description="steps of the whole run (the cosine schedule's length, "
                                                        "fixed across chunks)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine ends at this fraction of lr")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    bf16: bool = Field(True, description="bf16 autocast on a GPU (ignored on a CPU)")
    compile_llm: bool = Field(True, description="on a GPU, torch.compile the LLM with CUDA graphs "
                                                "(reduce-overhead): several times faster at batch 64 on an H100")
    log_every: int = Field(25, ge=1, description="steps between metric lines (and .item() calls)")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints inside a chunk")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept in the run folder")
    max_minutes: float = Field(120.0, gt=0, description="wall-clock budget of one chunk, checked by the loop")
    max_steps_per_chunk: int | None = Field(None, ge=1, description="stop a chunk after this many steps too")
    eval_batches: int = Field(8, ge=1, description="held-out batches evaluated at the end of each chunk")
    attention_videos: int = Field(3, ge=0, description="held-out videos whose attention is drawn after each chunk")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:1, ...")
    nproc: int = Field(1, ge=1, le=64, description="processes that train each chunk together on this host "
                                                   "(DDP, one per visible GPU, gloo on a CPU); each takes "
                                                   "batch_size/nproc rows of every batch")
    dist_timeout_s: float = Field(300.0, gt=0, description="with nproc > 1: seconds a process waits for the others "
                                                           "in a collective before the chunk fails")
    seed: int = Field(0, description="seed of the model's initialisation and of the data order")
    expect_dino: str | None = Field(None, description="DINOv2 id the store must have (None: the preset's)")
    expect_vae: str | None = Field(None, description="VAE id the store must have (None: the preset's)")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="metrics logging")

    @model_validator(mode="after")
    def _check_nproc(self) -> "TrainConfig":
        batch = self.loader.batch_size
        if batch % self.nproc:
            raise ValueError(
                f"loader.batch_size {batch} is not divisible by nproc {self.nproc}: every process takes an equal "
                f"slice of each batch; set --batch-size to a multiple of {self.nproc} or --nproc to a divisor "
                f"of {batch}")
        return self

    def expected_encoders(self) -> dict[str, str]:
        encoders = EncoderConfig.for_preset(self.preset)
        return {"dino": self.expect_dino or encoders.dino_id, "vae": self.expect_vae or encoders.vae_id}
