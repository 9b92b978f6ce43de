"""The parameters of the train flow as the deployment's Custom run form gets them: a few plain knobs, the whole
training config only as free-form advanced overrides (never TrainConfig's ~50 fields with the full preset's values)."""

from __future__ import annotations

from flows.train import train_flow
from tests.tasks.test_training import tiny_config


def test_the_knobs_are_top_level_fields_with_null_defaults_and_descriptions():
    schema = train_flow.parameters.model_dump()
    top = schema["properties"]
    for knob in ("batch_size", "lr", "max_minutes", "max_chunks"):
        assert top[knob]["default"] is None and "preset" in top[knob]["description"], knob
        assert {"type": "null"} in top[knob]["anyOf"], knob
    assert top["batch_size"]["anyOf"][0] == {"minimum": 1, "type": "integer"}
    assert top["lr"]["anyOf"][0] == {"exclusiveMinimum": 0, "type": "number"}
    assert top["train"]["default"] is None and top["train"]["anyOf"][0]["type"] == "object"
    assert "$ref" not in str(top["train"]) and "TrainConfig" not in schema.get("definitions", {})
    assert "preset" in top["train"]["description"] and top["preset"]["enum"] == ["demo", "full"]
    assert set(schema["required"]) == {"store", "run_dir"}


def test_a_whole_train_config_is_still_accepted_as_overrides():
    """What the command line and the tests pass: a TrainConfig becomes the dict of all its values."""
    config = tiny_config(max_steps_per_chunk=2)
    parameters = train_flow.validate_parameters({"store": "s", "run_dir": "r", "preset": "demo", "train": config})
    assert parameters["train"] == config.model_dump(mode="json")
