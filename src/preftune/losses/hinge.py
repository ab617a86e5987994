"""Hinge loss on the reference-adjusted margin: SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
Calibration with Human Feedback", arXiv:2305.10425, the rank-calibration loss max(0, δ − log π(y_w) +
log π(y_l))) in the reference-normalised form of RSO (Liu et al., ICLR 2024, "Statistical Rejection
Sampling Improves Preference Optimization", arXiv:2309.06657, the "hinge-norm" loss).

With h the reference-adjusted margin on SUMMED completion log-probs, the loss per pair is

    L = max(0, 1 − β h)

i.e. zero once β h ≥ 1 (the margin 1/β is met) and linear, with slope −β in h, below it. Deliberate choices:
- SLiC-HF's margin δ and its separate SFT regulariser are not part of this unit: δ is folded into β as
  δ = 1/β (as RSO and TRL's ``loss_type="hinge"`` do), and a cross-entropy term would be a different loss.
- No label smoothing: the hinge has no flipped-label form; the option is refused rather than ignored.
Rewards: β-scaled log-ratios, as in DPO.
"""

from __future__ import annotations

import torch

from preftune.losses.base import LossOutput, PreferenceLoss, check_beta, reference_margin, register


@register
class HingeLoss(PreferenceLoss):
    name = "hinge"
    needs_reference = True
    reduction = "sum"

    def __init__(self, beta: float = 0.1):
        check_beta(beta)
        self.beta = beta

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:
        h, chosen_rewards, rejected_rewards = reference_margin(self.beta, policy_chosen_logps, policy_rejected_logps,
                                                               ref_chosen_logps, ref_rejected_logps)
        losses = torch.relu(1.0 - self.beta * h)
        return LossOutput(losses, chosen_rewards, rejected_rewards)
