"""SimPO (Meng, Xia & Chen, NeurIPS 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward", eq. 6).

Reference-free: the implicit reward is the length-normalised policy log-likelihood
r(y) = (β/|y|) log π(y|x), so the unit asks for LENGTH-AVERAGED completion log-probs (``reduction =
"mean"``) and ignores any reference log-probs it is handed. The loss per pair is

    L = −log σ(β · (avg log π(y_w) − avg log π(y_l)) − γ)

with the target reward margin γ = ``gamma`` in logit units (TRL's ``simpo_gamma``; the SimPO repository
instead configures the ratio γ/β). Deliberate choices:
- Defaults β = 2.0 and γ = 0.5: β in the paper's recommended range (2.0–2.5); γ as TRL's default.
- ``label_smoothing`` ε (default 0) uses the same form as cDPO: −(1 − ε) log σ(z) − ε log σ(−z), with z
  the logit above, as in TRL's CPO/SimPO implementation.
Rewards: β · avg log π (chosen and rejected), as the paper defines the reward.
"""

from __future__ import annotations

from preftune.losses.base import (LossOutput, PreferenceLoss, check_beta, check_label_smoothing, register,
                                  smoothed_logistic_loss)


@register
class SimPOLoss(PreferenceLoss):
    name = "simpo"
    needs_reference = False
    reduction = "mean"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        check_beta(beta)
        if gamma < 0:
            raise ValueError("gamma (the target reward margin) must be >= 0")
        check_label_smoothing(label_smoothing)
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:
        del ref_chosen_logps, ref_rejected_logps  # reference-free by construction
        logits = self.beta * (policy_chosen_logps - policy_rejected_logps) - self.gamma
        losses = smoothed_logistic_loss(logits, self.label_smoothing)
        return LossOutput(losses, (self.beta * policy_chosen_logps).detach(),
                          (self.beta * policy_rejected_logps).detach())
