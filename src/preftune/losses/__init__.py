"""Preference losses as small registered units.

``get_loss(name, **params)`` returns a callable taking ``(policy_chosen_logps, policy_rejected_logps,
ref_chosen_logps, ref_rejected_logps)`` -- (B,) fp32 tensors; reference arguments are None for
reference-free losses -- and returning a :class:`LossOutput`. Each unit declares whether it needs the
reference and whether it wants summed or length-averaged log-probs, so the training loop never branches
on a loss name.
"""

from __future__ import annotations

from preftune.losses.base import LossOutput, PreferenceLoss, get_loss, loss_names, register
from preftune.losses import sigmoid as _sigmoid  # noqa: F401  (registers "sigmoid")

__all__ = ["LossOutput", "PreferenceLoss", "get_loss", "loss_names", "register"]
