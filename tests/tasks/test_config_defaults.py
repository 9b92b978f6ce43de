"""Defaults defined once: presets of the training configs, one frame size, one download folder."""

import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from model.encoder_config import EncoderConfig
from model.presets import PRESET_NAMES
from tasks.convergence import ConvergenceConfig
from tasks.decode import DecodeConfig
from tasks.download import download_folder
from tasks.precompute import PrecomputeConfig
from tasks.train_config import TrainConfig


def test_training_presets_keep_their_recipes():
    demo = TrainConfig.for_preset("demo")
    assert demo.preset == "demo" and demo.model.llm is None and demo.loader.batch_size == 8
    assert (demo.lr, demo.total_steps, demo.max_minutes) == (1e-3, 600, 1.0)
    assert TrainConfig.for_preset("full") == TrainConfig()
    assert TrainConfig.for_preset("demo", loader={"batch_size": 4}).loader.eval_fraction == 0.2  # merged
    rule = ConvergenceConfig.for_preset("demo")
    assert (rule.min_steps, rule.window, rule.tolerance_pct, rule.max_chunks) == (300, 3, 1.0, 8)
    assert ConvergenceConfig.for_preset("full") == ConvergenceConfig()
    for name in PRESET_NAMES:
        assert TrainConfig.for_preset(name).expected_encoders()["dino"] == EncoderConfig.for_preset(name).dino_id


def test_decode_size_is_the_encoder_frame_size():
    assert DecodeConfig().size == EncoderConfig().frame_size
    PrecomputeConfig(encoder=EncoderConfig(frame_size=224), decode=DecodeConfig(size=224))  # the same: fine
    with pytest.raises(ValidationError, match=r"decode.size \(256\) differs from encoder.frame_size \(224\)"):
        PrecomputeConfig(encoder=EncoderConfig(frame_size=224))


def test_download_folder_defaults_to_the_temp_dir(tmp_path):
    assert download_folder(None) == Path(tempfile.gettempdir()) / "fvlm-downloads"
    assert download_folder(str(tmp_path)) == tmp_path
