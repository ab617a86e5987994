"""Robust DPO (rDPO; Chowdhury, Kini & Natarajan, ICML 2024, "Provably Robust DPO: Aligning Language
Models with Noisy Feedback", arXiv:2403.00409, Section 3: the de-biased loss ℓ̂_ε).

With h the reference-adjusted margin on SUMMED completion log-probs (as in DPO) and ε = ``label_smoothing``
the known probability that a preference label was flipped, the loss per pair is

    L = [(1 − ε) · (−log σ(β h)) − ε · (−log σ(−β h))] / (1 − 2ε)

which is an unbiased estimate of the clean-label DPO loss under ε-flip noise. Deliberate choices:
- Unlike cDPO (``sigmoid`` with ``label_smoothing``), the ε-term is SUBTRACTED and the sum is rescaled by
  1/(1 − 2ε); hence ε must lie in [0, 0.5) (at 0.5 the labels carry no information and the estimator
  divides by zero). ε = 0 is plain DPO.
- For ε > 0 the loss is not bounded below: as β h → +∞ it tends to −ε β h / (1 − 2ε). This is the paper's
  estimator as written (and TRL's ``loss_type="robust"``); we do not clip it.
- Computed in the algebraically identical form L = −log σ(β h) − ε/(1 − 2ε) · β h (substitute
  −log σ(−z) = −log σ(z) + z): the paper's form subtracts two nearly equal terms and divides by 1 − 2ε,
  which loses ~50× fp32 precision at ε = 0.49; this form does not. It also shows rDPO is DPO plus a
  linear push on the margin, so its gradient in h is always negative (never vanishes).
- At π = π_ref, h = 0 and L = ((1 − ε) log 2 − ε log 2) / (1 − 2ε) = log 2 for every ε.
- Default ε = 0.0 as in TRL, so ``robust`` without ``label_smoothing`` is exactly ``sigmoid``.
Rewards: β-scaled log-ratios, as in DPO.
"""

from __future__ import annotations

import torch.nn.functional as F

from preftune.losses.base import (LossOutput, PreferenceLoss, check_beta, check_label_smoothing, reference_margin,
                                  register)


@register
class RobustLoss(PreferenceLoss):
    name = "robust"
    needs_reference = True
    reduction = "sum"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        check_beta(beta)
        check_label_smoothing(label_smoothing, "label_smoothing (the label-flip rate ε)")
        self.beta = beta
        self.label_smoothing = label_smoothing

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:
        h, chosen_rewards, rejected_rewards = reference_margin(self.beta, policy_chosen_logps, policy_rejected_logps,
                                                               ref_chosen_logps, ref_rejected_logps)
        logits = self.beta * h
        eps = self.label_smoothing
        # == ((1 - eps) * -logsigmoid(z) - eps * -logsigmoid(-z)) / (1 - 2 eps), see the docstring
        losses = -F.logsigmoid(logits) - (eps / (1 - 2 * eps)) * logits
        return LossOutput(losses, chosen_rewards, rejected_rewards)
