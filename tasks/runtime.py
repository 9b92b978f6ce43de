"""Small runtime helpers shared by tasks: device choice, progress bars."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from tqdm import tqdm

PROGRESS_ENV = "FVLM_PROGRESS"  # set to 1 by the command line


def progress_bar(**kwargs: Any) -> tqdm:
    """A progress bar on stderr when the command line asked for one and stderr is a terminal, else a silent one.

    Deployments and tests leave it off: their progress is in logs and Prefect artifacts.
    """
    enabled = os.environ.get(PROGRESS_ENV) == "1" and sys.stderr.isatty()
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def resolve_device(name: str = "auto") -> str:
    """'auto' picks the first GPU when there is one; anything else is checked and returned as is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA device is visible (set --device cpu or auto)")
    return name
