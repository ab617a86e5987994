"""DPO (Rafailov et al., NeurIPS 2023, eq. 7) with conservative label smoothing (cDPO).

With h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) on SUMMED completion
log-probs (the paper's sequence log-likelihood), the loss per pair is

    L = −(1 − ε) · log σ(β h) − ε · log σ(−β h)

ε = ``label_smoothing`` is the assumed probability that the preference label is flipped (cDPO, Mitchell
2023); ε = 0 is plain DPO. At π = π_ref, h = 0 and L = log 2 for every ε.
"""

from __future__ import annotations

import torch.nn.functional as F

from preftune.losses.base import LossOutput, PreferenceLoss, register


@register
class SigmoidLoss(PreferenceLoss):
    name = "sigmoid"
    needs_reference = True
    reduction = "sum"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        if beta <= 0:
            raise ValueError("beta must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        self.beta = beta
        self.label_smoothing = label_smoothing

    def compute(self, pc, pr, rc, rr) -> LossOutput:
        chosen_logratio = pc - rc
        rejected_logratio = pr - rr
        logits = self.beta * (chosen_logratio - rejected_logratio)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return LossOutput(losses, (self.beta * chosen_logratio).detach(), (self.beta * rejected_logratio).detach())
