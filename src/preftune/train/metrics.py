"""The one metrics accumulator: named (sum, count) pairs kept as tensors on the device, added micro-batch by
micro-batch, summed across processes, and divided once when they are read (the visible sync point).

Every mean preftune reports (training windows, held-out evaluation of DPO, SFT and the reward model) is a sum
over all units (pairs, tokens, examples) divided by their count, never a mean of per-batch means: gradient
accumulation, the evaluation batch size and the number of processes do not change it, and an accuracy cannot
exceed 1.
"""

from __future__ import annotations

import torch

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (sum, count), what a step or forward returns


class MetricSums:
    """Running (sum, count) pairs by name."""

    def __init__(self, sums: Stats | None = None):
        self.sums: Stats = dict(sums or {})

    def __bool__(self) -> bool:
        return bool(self.sums)

    def add(self, stats: Stats) -> None:
        """Add a step's or batch's (sum, count) pairs (detached; the first of a name is copied, never aliased)."""
        for name, (s, c) in stats.items():
            if name in self.sums:
                total, count = self.sums[name]
                self.sums[name] = (total + s.detach(), count + c)
            else:
                self.sums[name] = (s.detach().clone(), c.clone() if isinstance(c, torch.Tensor) else torch.tensor(c))

    def merge(self, other: MetricSums) -> None:
        """Add another accumulator's sums into this one."""
        self.add(other.sums)

    def summed(self, procs) -> MetricSums:
        """The sums over every process (``procs.sum_stats``: one collective); the same object in one process."""
        return MetricSums(procs.sum_stats(self.sums)) if procs is not None and procs.world > 1 else self

    def means(self) -> dict[str, float]:
        """sum / count per name, as floats (a name counted 0 times reads 0)."""
        return {name: (s / c.clamp(min=1)).item() for name, (s, c) in self.sums.items()}

    def state(self) -> dict[str, list[float]]:
        """For a checkpoint (a sync; at save time only). fp32 sums round-trip exactly through Python floats."""
        return {name: [float(s), float(c)] for name, (s, c) in self.sums.items()}

    @classmethod
    def from_state(cls, state: dict[str, list[float]], device: torch.device) -> MetricSums:
        return cls({name: (torch.tensor(s, dtype=torch.float32, device=device),
                           torch.tensor(c, dtype=torch.float32, device=device)) for name, (s, c) in state.items()})

    def zeros_like(self) -> MetricSums:
        """The same names at zero (what a process other than the first resumes with, so collectives match)."""
        return MetricSums({name: (torch.zeros_like(s), torch.zeros_like(c)) for name, (s, c) in self.sums.items()})
