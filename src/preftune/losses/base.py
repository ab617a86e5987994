"""The loss interface and registry."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    """``losses``: (B,) per-pair loss (the loop averages over pairs); ``chosen_rewards`` and
    ``rejected_rewards``: (B,) β-scaled implicit rewards, detached (for metrics only)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class PreferenceLoss:
    """Base of a loss unit. Subclasses set the class attributes and implement ``compute``."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = True
    # "sum": the loop passes summed completion log-probs; "mean": length-averaged (sum / completion tokens).
    # Not a ClassVar: a unit whose parameter decides it (IPO's average_log_probs) sets it per instance.
    reduction: str = "sum"

    def __call__(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 ref_chosen_logps: torch.Tensor | None = None,
                 ref_rejected_logps: torch.Tensor | None = None) -> LossOutput:
        assert policy_chosen_logps.shape == policy_rejected_logps.shape and policy_chosen_logps.dim() == 1
        if self.needs_reference:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError(f"loss '{self.name}' needs reference log-probs")
            assert ref_chosen_logps.shape == policy_chosen_logps.shape
        return self.compute(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError


def check_beta(beta: float, name: str = "beta") -> None:
    if beta <= 0:
        raise ValueError(f"{name} must be > 0")


def check_label_smoothing(eps: float, name: str = "label_smoothing") -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"{name} must be in [0, 0.5)")


def reference_margin(beta: float, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor,
                     rr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, chosen_rewards, rejected_rewards) for reference-based losses: h = (pc − rc) − (pr − rr), (B,), and
    the β-scaled log-ratios β(pc − rc), β(pr − rr), detached (metrics only)."""
    chosen_logratio, rejected_logratio = pc - rc, pr - rr
    return (chosen_logratio - rejected_logratio, (beta * chosen_logratio).detach(),
            (beta * rejected_logratio).detach())


def smoothed_logistic_loss(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1 − ε) log σ(z) − ε log σ(−z): the logistic loss with labels flipped at rate ε (cDPO; ε = 0: plain)."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


_REGISTRY: dict[str, type[PreferenceLoss]] = {}


def register(cls: type[PreferenceLoss]) -> type[PreferenceLoss]:
    _REGISTRY[cls.name] = cls
    return cls


def loss_names() -> list[str]:
    return sorted(_REGISTRY)


def _loss_class(name: str) -> type[PreferenceLoss]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(loss_names())}")
    return _REGISTRY[name]


def loss_params(name: str) -> set[str]:
    """The parameter names loss ``name`` accepts (its ``__init__`` keywords); the config layer uses this to
    refuse options the chosen loss would ignore."""
    return set(inspect.signature(_loss_class(name).__init__).parameters) - {"self"}


def get_loss(name: str, **params) -> PreferenceLoss:
    """Instantiate a registered loss; unknown names and unknown parameters fail loudly (never ignored)."""
    cls = _loss_class(name)
    accepted = loss_params(name)
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"loss {name!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    return cls(**params)
