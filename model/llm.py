"""The LLM factory: the decoder stack (no LM head) of a pretrained or randomly initialised Llama-style model."""

import logging
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoModel, LlamaConfig, LlamaModel, PreTrainedModel

from model.config import ModelConfig

logger = logging.getLogger(__name__)


class LLMNotFoundError(FileNotFoundError):
    """The LLM named by `ModelConfig.llm` is neither a local folder nor a loadable hub model."""


def build_llm(config: ModelConfig) -> PreTrainedModel:
    """The LLM's decoder stack in float32: from `config.llm` (hub id or local folder), or random from `llm_shape`.

    Only the base model is built: the model feeds `inputs_embeds` and reads the last hidden state, so the LM head
    of a causal-LM checkpoint is never needed (its weights, if saved, are skipped when loading).
    """
    if config.llm is None:
        return _build_random_llm(config)
    return _load_pretrained_llm(config)


def _build_random_llm(config: ModelConfig) -> PreTrainedModel:
    shape = config.llm_shape
    llama_config = LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=True,
        use_cache=False,
        attn_implementation=config.attn_implementation,
    )
    # A private RNG stream: the same config always gives the same weights, and the caller's RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.llm_seed)
        llm = LlamaModel(llama_config)
    return llm.float()


def _load_pretrained_llm(config: ModelConfig) -> PreTrainedModel:
    name = config.llm
    folder = Path(name).expanduser()
    if folder.is_file():
        raise LLMNotFoundError(f"llm={name!r} is a file; set llm to a model folder (with config.json) or a hub id")
    if not folder.is_dir() and _looks_like_path(name):
        raise LLMNotFoundError(
            f"LLM folder {name!r} does not exist: set llm to an existing local folder or a hub id "
            f"such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    source = str(folder) if folder.is_dir() else name
    kwargs = {_dtype_argument(): torch.float32, "attn_implementation": config.attn_implementation}
    if config.llm_revision is not None:
        kwargs["revision"] = config.llm_revision
    try:
        # float32 master weights: transformers 5 would otherwise keep the checkpoint's dtype (bf16 for SmolLM2),
        # and the training step runs its matmuls in bf16 through autocast anyway.
        llm = AutoModel.from_pretrained(source, **kwargs)
    except OSError as err:
        raise LLMNotFoundError(
            f"could not load the LLM llm={name!r} (revision {config.llm_revision or 'main'}): {err}. "
            f"Offline, set llm to a local folder saved with save_pretrained, or download it into the HF cache first."
        ) from err
    logger.info("loaded LLM %s (%d parameters)", source, sum(p.numel() for p in llm.parameters()))
    return llm


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `namespace/name`; anything else that does not exist locally is a missing folder."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _dtype_argument() -> str:
    """transformers >= 4.56 takes `dtype` (5.x deprecates `torch_dtype`); older 4.x only `torch_dtype`."""
    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
