"""build_llm: local folders, random builds, clear errors. Tiny configs, no network."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import LLMShape, ModelConfig
from model.llm import LLMNotFoundError, build_llm


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"llm": None, "llm_shape": LLMShape.tiny(), **overrides})


@pytest.fixture
def saved_causal_lm(tmp_path):
    """A tiny random Llama causal LM saved in bfloat16 with an untied LM head, as a hub download would be."""
    shape = LLMShape.tiny()
    config = LlamaConfig(
        hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size, max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    causal_lm = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = tmp_path / "tiny-llama"
    causal_lm.save_pretrained(folder)
    return folder, causal_lm


def test_local_folder_loads_the_decoder_weights_in_float32(saved_causal_lm):
    folder, causal_lm = saved_causal_lm
    llm = build_llm(tiny_config(llm=str(folder)))

    expected = causal_lm.model.state_dict()
    loaded = llm.state_dict()
    assert set(loaded) == set(expected)  # the decoder only: no lm_head
    assert not any("lm_head" in name for name in loaded)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name  # not the checkpoint's bf16
        torch.testing.assert_close(tensor, expected[name].float(), rtol=0, atol=0, msg=name)
    assert llm.config._attn_implementation == "sdpa"


def test_local_folder_gives_the_same_last_hidden_state(saved_causal_lm):
    folder, causal_lm = saved_causal_lm
    llm = build_llm(tiny_config(llm=str(folder), attn_implementation="eager"))
    assert llm.config._attn_implementation == "eager"
    embeds = torch.randn(2, 5, llm.config.hidden_size)
    ours = llm(inputs_embeds=embeds, use_cache=False).last_hidden_state
    reference = causal_lm.model.float()(inputs_embeds=embeds, use_cache=False).last_hidden_state
    torch.testing.assert_close(ours, reference)


def test_random_build_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    first = build_llm(tiny_config())
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = build_llm(tiny_config())
    after_second = torch.rand(3)
    other_seed = build_llm(tiny_config(llm_seed=7))

    assert torch.equal(after_first, after_second)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    weight = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first.state_dict()[weight], other_seed.state_dict()[weight])
    assert first.config.num_hidden_layers == 2 and first.config.hidden_size == 64
    assert first.config.num_key_value_heads == 2


def test_missing_local_folder_names_the_setting(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LLMNotFoundError, match="llm") as info:
        build_llm(tiny_config(llm=str(missing)))
    assert str(missing) in str(info.value)


def test_file_instead_of_folder_names_the_setting(tmp_path):
    not_a_folder = tmp_path / "weights.bin"
    not_a_folder.write_bytes(b"")
    with pytest.raises(LLMNotFoundError, match="llm="):
        build_llm(tiny_config(llm=str(not_a_folder)))


def test_unknown_hub_id_offline_names_the_setting():
    # tests/conftest.py sets HF_HUB_OFFLINE=1: the hub is not reached, the lookup fails at once.
    with pytest.raises(LLMNotFoundError, match="llm='nobody-here/not-a-model'"):
        build_llm(tiny_config(llm="nobody-here/not-a-model"))


def test_presets():
    full = ModelConfig.for_preset("full")
    assert full.llm == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (full.feature_dim, full.num_tokens, full.query_dim, full.fine_iterations) == (384, 325, 384, 2)
    assert (full.head_hidden, full.head_channels) == (512, (64, 128, 256))
    demo = ModelConfig.for_preset("demo")
    assert demo.llm is None and demo.llm_shape == LLMShape.tiny()
    assert (demo.feature_dim, demo.num_tokens, demo.latent_size) == (384, 325, 32)
    with pytest.raises(ValueError):
        ModelConfig(fine_iterations=0)
