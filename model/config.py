"""Configuration of the EfficientFoveatedModel (see ../shared/MODEL_SPEC.md) and of the LLM inside it."""

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from model.presets import Presets, PresetTable

SMOLLM2_135M_INSTRUCT = "HuggingFaceTB/SmolLM2-135M-Instruct"


class LLMShape(BaseModel):
    """Architecture of a Llama-style decoder, used when the LLM is built from scratch (`ModelConfig.llm` is None)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(576, ge=1, description="Width H of the decoder's hidden state.")
    num_layers: int = Field(30, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(9, ge=1, description="Attention heads per layer (must divide hidden_size).")
    num_kv_heads: int = Field(3, ge=1, description="Key/value heads per layer (grouped-query attention).")
    intermediate_size: int = Field(1536, ge=1, description="Width of the MLP inside each layer.")
    vocab_size: int = Field(49152, ge=1, description="Rows of the (unused) token embedding table.")
    rope_theta: float = Field(100000.0, gt=0, description="Base of the rotary position embedding.")
    max_position_embeddings: int = Field(8192, ge=1, description="Longest sequence the rotary cache is built for.")
    rms_norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the RMS norms.")

    @classmethod
    def tiny(cls) -> "LLMShape":
        """A two-layer decoder for tests and the CPU demo (milliseconds per step)."""
        return cls(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
            vocab_size=128, rope_theta=10000.0, max_position_embeddings=64,
        )

    @classmethod
    def smollm2_135m(cls) -> "LLMShape":
        """The SmolLM2-135M architecture, so a benchmark can build a full-size model without the hub."""
        return cls(
            hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
            vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
        )


class ModelConfig(Presets, BaseModel):
    """Shapes and settings of EfficientFoveatedModel; the defaults are MODEL_SPEC.md's.

    Presets (`ModelConfig.for_preset`): `full` is the spec with the pretrained SmolLM2; `demo` has the same tensor
    shapes with a tiny random LLM and small head widths, so that a CPU trains the demo in minutes.
    """

    model_config = ConfigDict(extra="forbid")
    PRESETS: ClassVar[PresetTable] = {
        "full": {},
        "demo": {"llm": None, "llm_shape": LLMShape.tiny(), "head_hidden": 64, "head_channels": (16, 32, 32)},
    }

    feature_dim: int = Field(384, ge=1, description="D: width of a DINOv2 token (384 for ViT-S).")
    num_tokens: int = Field(325, ge=1, description="N: DINOv2 tokens per frame (CLS + 18x18 patches).")
    query_dim: int = Field(384, ge=1, description="Dq: width of the per-frame query vectors.")
    latent_channels: int = Field(4, ge=1, description="Channels of a VAE latent (4 for SD-VAE).")
    latent_size: int = Field(32, ge=1, description="Height and width of a VAE latent (32 for 256x256 frames).")
    fine_iterations: int = Field(2, ge=1, description="Fine passes after the coarse pass (coarse -> fine1 -> fine2).")
    lambda_coarse: float = Field(1.0, ge=0, description="Weight of loss_coarse in the total loss.")
    llm: str | None = Field(
        SMOLLM2_135M_INSTRUCT,
        description="Hugging Face hub id or local folder of the LLM; None builds a random LLM from llm_shape.",
    )
    llm_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of llm; None = main.")
    llm_shape: LLMShape = Field(
        default_factory=LLMShape.smollm2_135m, description="Architecture of the random LLM used when llm is None."
    )
    llm_seed: int = Field(0, description="Seed of the random LLM's initialisation (llm None), so rebuilds match.")
    head_hidden: int = Field(512, ge=1, description="Hidden width of the prediction head's FiLM MLP.")
    head_channels: tuple[int, int, int] = Field(
        (64, 128, 256), description="Conv widths of the prediction head (the last one is the FiLM width)."
    )
    attn_implementation: str = Field(
        "sdpa", description="Attention kernel of the LLM as transformers names it: sdpa, eager, flash_attention_2."
    )
