"""The one evaluation routine of DPO, SFT and reward training: held-out metrics summed exactly over every item
(and every process) and divided once."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from preftune.data.collate import batch_to
from preftune.models.logprobs import autocast_context
from preftune.train.distributed import Processes
from preftune.train.metrics import MetricSums, Stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, forward: Callable[[dict[str, torch.Tensor]], Stats], items: Sequence[Any],
             collate: Callable[[list[Any]], dict[str, torch.Tensor]], batch_size: int, device: torch.device,
             precision: str = "fp32", procs: Processes | None = None) -> dict[str, float]:
    """``forward(batch) -> {name: (sum, count)}`` over ``items`` in batches of ``batch_size``, in eval mode (restored
    after) under ``precision``'s autocast; shared out over several processes (every world-th item each, sums
    added). Returns the means."""
    procs = procs if procs is not None else Processes()
    items, shared = procs.eval_shard(items)
    was_training = model.training
    model.eval()
    sums = MetricSums()
    try:
        for start in range(0, len(items), batch_size):
            batch = batch_to(collate(list(items[start:start + batch_size])), device)
            with autocast_context(device, precision):
                sums.add(forward(batch))
    finally:
        model.train(was_training)
    return (sums.summed(procs) if shared else sums).means()
