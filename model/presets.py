"""Presets, one way for every config: `Config.for_preset(name, **overrides)` from the class's `PRESETS` table.

`full` is the seed's recipe (real encoders, SmolLM2, GPU); `demo` keeps the tensor shapes and shrinks the rest so a
CPU runs the whole pipeline in minutes. A class lists, per preset, only the fields that differ from its defaults:

    class ConvergenceConfig(Presets, BaseModel):
        PRESETS: ClassVar[PresetTable] = {"full": {}, "demo": {"min_steps": 300, "window": 3}}

    ConvergenceConfig.for_preset("demo", window=4)

A class with a `preset` field gets it set to the preset's name. An override that is a dict and lands on a nested
config is merged into the preset's value of it (`TrainConfig.for_preset("demo", loader={"batch_size": 4})` keeps the
demo's other loader settings) rather than replacing it.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal, Mapping, TypeVar, get_args

from pydantic import BaseModel

PresetName = Literal["demo", "full"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)
PresetTable = Mapping[str, Mapping[str, Any]]

C = TypeVar("C", bound=BaseModel)


def merge_values(base: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `updates` over it; a dict update of a nested config (model or dict) is merged, not swapped."""
    merged = dict(base)
    for key, value in updates.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, BaseModel):
            current = current.model_dump()
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            value = merge_values(current, value)
        merged[key] = value
    return merged


class Presets:
    """Mixin of a pydantic config: `for_preset(name, **overrides)` from the class's PRESETS table."""

    PRESETS: ClassVar[PresetTable] = {name: {} for name in PRESET_NAMES}

    @classmethod
    def preset_values(cls, name: str) -> dict[str, Any]:
        """The fields preset `name` sets (a deep copy: callers may change it)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}: use one of {', '.join(sorted(cls.PRESETS))}")
        values = copy.deepcopy(dict(cls.PRESETS[name]))
        if "preset" in getattr(cls, "model_fields", {}):
            values.setdefault("preset", name)
        return values

    @classmethod
    def for_preset(cls: type[C], name: str, **overrides: Any) -> C:
        """The config of preset `name` with `overrides` over it (dicts merge into nested configs)."""
        return cls.model_validate(merge_values(cls.preset_values(name), overrides))  # type: ignore[attr-defined]
