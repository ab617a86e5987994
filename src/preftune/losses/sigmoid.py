"""DPO (Rafailov et al., NeurIPS 2023, eq. 7) with conservative label smoothing (cDPO).

With h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) on SUMMED completion
log-probs (the paper's sequence log-likelihood), the loss per pair is

    L = −(1 − ε) · log σ(β h) − ε · log σ(−β h)

ε = ``label_smoothing`` is the assumed probability that the preference label is flipped (cDPO, Mitchell
2023); ε = 0 is plain DPO. At π = π_ref, h = 0 and L = log 2 for every ε.
"""

from __future__ import annotations

from preftune.losses.base import (LossOutput, PreferenceLoss, check_beta, check_label_smoothing, reference_margin,
                                  register, smoothed_logistic_loss)


@register
class SigmoidLoss(PreferenceLoss):
    name = "sigmoid"
    needs_reference = True
    reduction = "sum"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        check_beta(beta)
        check_label_smoothing(label_smoothing)
        self.beta = beta
        self.label_smoothing = label_smoothing

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:
        h, chosen_rewards, rejected_rewards = reference_margin(self.beta, policy_chosen_logps, policy_rejected_logps,
                                                               ref_chosen_logps, ref_rejected_logps)
        return LossOutput(smoothed_logistic_loss(self.beta * h, self.label_smoothing), chosen_rewards, rejected_rewards)
