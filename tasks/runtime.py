"""Small runtime helpers shared by tasks: device choice."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> str:
    """'auto' picks the first GPU when there is one; anything else is checked and returned as is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA device is visible (set --device cpu or auto)")
    return name
