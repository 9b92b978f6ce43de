"""Where this process stands among the processes that train one chunk together, and the few things they agree on.

A chunk run with nproc > 1 (tasks/distributed.py) is one torch.distributed job: every rank trains on its slice of
every global batch, and the ranks must take the same decisions at the same step, or a collective waits forever.
`Ranks` is what the Trainer sees of that: its rank, and reductions that are no-ops in a single process, so the
single-process path runs no collective at all.

Two process groups: the default one (nccl on GPUs, gloo on a CPU) reduces tensors that live on the device (loss
windows, evaluation sums); a gloo group on the CPU carries the per-step control decisions (stop, out of memory),
so that agreeing on them never waits for the GPU's queue of kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

# Why a chunk's loop stops, lowest first: the ranks take the highest any of them saw (one rank's cancel or time-out
# stops all of them; the step limits are the same everywhere).
STOP_REASONS = (None, "time", "steps", "total_steps", "cancelled")


@dataclass
class Ranks:
    """rank of world processes; device: this rank's device (None: the config's). One process: world 1."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    control: Any = field(default=None, repr=False)  # the gloo group of control decisions

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, history, wandb and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a CPU collective on the control group)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def agree_stop(self, reason: str | None) -> str | None:
        """The stop reason every rank acts on: the highest one seen by any rank (see STOP_REASONS)."""
        if not self.distributed:
            return reason
        code = torch.tensor([STOP_REASONS.index(reason)], dtype=torch.int32)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.control)
        return STOP_REASONS[int(code.item())]

    def average_(self, *tensors: torch.Tensor) -> None:
        """Each tensor (on this rank's device) replaced in place by its mean over the ranks."""
        if not self.distributed:
            return
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor /= self.world

    def sum(self, values: Sequence[float]) -> list[float]:
        """The values summed over the ranks (float64, on the control group)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(total, group=self.control)
        return total.tolist()

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of `rows` (sizes differ by at most one; empty when rows < world)."""
        return np.array_split(np.asarray(rows), self.world)[self.rank]
