"""IPO (Azar et al., AISTATS 2024, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", eq. 17; the empirical loss of the IPO section).

With h the reference-adjusted margin, the loss per pair is the squared regression of h onto 1/(2β):

    L = (h − 1/(2β))²        (β plays the role of the paper's regulariser τ)

so L = 0 exactly at h = 1/(2β): unlike DPO the margin is pulled to a finite target, not pushed to ∞.

Deliberate choice -- which log-probs h is built from (``average_log_probs``):
- True (default): per-token AVERAGED completion log-probs (``reduction = "mean"``), as in the IPO authors'
  released implementation and TRL's ``loss_type="ipo"``. Summed log-probs of long completions make h
  large, and the fixed target 1/(2β) would then mean very different things for short and long answers.
- False: SUMMED sequence log-probs (``reduction = "sum"``), the paper's formula as written.
The unit sets ``self.reduction`` from this flag; the training loop reads it and never branches on a name.
Rewards: β-scaled log-ratios of whichever reduction is in use.
"""

from __future__ import annotations

from preftune.losses.base import LossOutput, PreferenceLoss, check_beta, reference_margin, register


@register
class IPOLoss(PreferenceLoss):
    name = "ipo"
    needs_reference = True
    reduction = "mean"

    def __init__(self, beta: float = 0.1, average_log_probs: bool = True):
        check_beta(beta)
        if not isinstance(average_log_probs, bool):
            raise TypeError("average_log_probs must be a bool")
        self.beta = beta
        self.average_log_probs = average_log_probs
        self.reduction = "mean" if average_log_probs else "sum"

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:
        h, chosen_rewards, rejected_rewards = reference_margin(self.beta, policy_chosen_logps, policy_rejected_logps,
                                                               ref_chosen_logps, ref_rejected_logps)
        losses = (h - 1.0 / (2.0 * self.beta)) ** 2
        return LossOutput(losses, chosen_rewards, rejected_rewards)
