"""Preference losses as small registered units.

``get_loss(name, **params)`` returns a callable taking ``(policy_chosen_logps, policy_rejected_logps,
ref_chosen_logps, ref_rejected_logps)`` -- (B,) fp32 tensors; reference arguments are None for
reference-free losses -- and returning a :class:`LossOutput`. Each unit declares whether it needs the
reference and whether it wants summed or length-averaged log-probs, so the training loop never branches
on a loss name.
"""

from __future__ import annotations

from preftune.losses.base import LossOutput, PreferenceLoss, get_loss, loss_names, loss_params, register

# Importing a unit registers it under its ``name``.
from preftune.losses import sigmoid as _sigmoid  # noqa: F401  (DPO / cDPO)
from preftune.losses import robust as _robust  # noqa: F401  (rDPO)
from preftune.losses import ipo as _ipo  # noqa: F401  (IPO)
from preftune.losses import hinge as _hinge  # noqa: F401  (SLiC-HF / RSO hinge)
from preftune.losses import simpo as _simpo  # noqa: F401  (SimPO, reference-free)
from preftune.losses import orpo as _orpo  # noqa: F401  (ORPO, reference-free)

__all__ = ["LossOutput", "PreferenceLoss", "get_loss", "loss_names", "loss_params", "register"]
