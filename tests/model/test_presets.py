"""Presets, one way: `for_preset(name, **overrides)` from each config's table."""

import pytest

from model.config import LLMShape, ModelConfig
from model.encoder_config import DEMO_DINO_ID, EncoderConfig
from model.presets import PRESET_NAMES, merge_values


def test_model_presets_are_the_spec_and_a_tiny_model_with_the_same_shapes():
    assert ModelConfig.for_preset("full") == ModelConfig()
    demo = ModelConfig.for_preset("demo")
    assert demo.llm is None and demo.llm_shape == LLMShape.tiny() and demo.head_channels == (16, 32, 32)
    assert (demo.feature_dim, demo.num_tokens, demo.latent_size) == (384, 325, 32)


def test_every_preset_of_every_config_validates():
    for config in (ModelConfig, EncoderConfig):
        assert set(config.PRESETS) == set(PRESET_NAMES)
        for name in PRESET_NAMES:
            config.for_preset(name)


def test_a_preset_field_is_set_and_overrides_apply():
    demo = EncoderConfig.for_preset("demo", seed=3)
    assert (demo.preset, demo.seed, demo.dino_id) == ("demo", 3, DEMO_DINO_ID)


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown ModelConfig preset 'tiny': use one of demo, full"):
        ModelConfig.for_preset("tiny")


def test_a_dict_override_merges_into_the_presets_nested_config():
    demo = ModelConfig.for_preset("demo", llm_shape={"num_layers": 3})
    assert demo.llm_shape.num_layers == 3 and demo.llm_shape.hidden_size == LLMShape.tiny().hidden_size
    assert merge_values({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_the_table_is_not_changed_by_a_caller():
    ModelConfig.for_preset("demo").llm_shape.num_layers = 9
    assert ModelConfig.for_preset("demo").llm_shape.num_layers == LLMShape.tiny().num_layers
