"""FSDP2 (torch's ``fully_shard``) for the policy, the frozen reference and the reward model.

Each decoder layer is one FSDP unit, then the root: the module a training step calls (``LogpsModule(policy)``,
whose forward runs the decoder and the chunked LM head, or the reward model), so the embeddings, final norm and
head are gathered by the root's own forward. The frozen reference is sharded the same way and resharded after
every forward, so no process ever holds more than its share plus one layer. The same code runs on GPUs over NCCL
and on CPU processes over gloo (the tests). Gradients are reduced as a SUM (the loss is already normalised by
the global pair or token count): gloo's AVG reduction has been wrong for FSDP2 (pytorch#162338) and
``PREMUL_SUM`` does not exist on gloo, so FSDP is told to use sum-type collectives with a divide factor of 1.
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The decoder layers inside ``module``: the classes a Hugging Face model names in ``_no_split_modules``."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(module).__name__}: no decoder layers found to shard (a Hugging Face model lists "
                         "their classes in _no_split_modules)")
    return blocks


def shard(module: nn.Module, mesh, *, reshard_after_forward: bool = True) -> nn.Module:
    """``module`` sharded in place over ``mesh``: one FSDP unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    units = [*transformer_blocks(module), module]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for unit in units:
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_gradient_divide_factor(1.0)
    return module


def local_fraction(module: nn.Module) -> float:
    """The share of ``module``'s parameter elements this process holds (1.0 unsharded)."""
    from torch.distributed.tensor import DTensor

    total = local = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local / max(total, 1)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered whole, on the CPU of process 0 (empty elsewhere). A collective:
    every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def scalar(value: torch.Tensor) -> torch.Tensor:
    """A reduction's result as a plain tensor (``clip_grad_norm_`` over sharded gradients returns a DTensor)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
