"""ORPO (Hong, Lee & Thorne, EMNLP 2024, "ORPO: Monolithic Preference Optimization without Reference
Model", eqs. 6–7).

Reference-free, on LENGTH-AVERAGED completion log-probs (``reduction = "mean"``), as the paper defines
P_θ(y|x) as the geometric mean of token probabilities. With a = avg log π(y|x) < 0,

    log odds(y) = a − log(1 − e^a)
    L_OR        = −log σ(log odds(y_w) − log odds(y_l))                       (eq. 7)
    L           = −a_w + λ · L_OR,   λ = ``beta`` (default 0.1, the paper's λ)  (eq. 6)

Deliberate choices:
- Numerics: log(1 − e^a) is computed as log(−expm1(a)), which stays accurate for a near 0 where
  log1p(−exp(a)) loses all precision in fp32, and a is first clamped to ≤ −1e-6 so that a = 0 (a
  completion predicted with probability 1, which fp32 log-softmax can return) gives a finite log-odds
  (≈ 13.8) and gradient instead of ±inf. Below −1e-6 the clamp changes nothing.
- The NLL term is −a_w PER PAIR (each pair's chosen tokens averaged, then the loop averages pairs). TRL's
  ORPOTrainer instead averages the NLL over all chosen tokens of the batch (token-weighted), so batches
  with completions of unequal length weight them differently there.
- Rewards: β · avg log π of chosen and rejected, as TRL logs them (ORPO has no implicit reward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.losses.base import LossOutput, PreferenceLoss, check_beta, register

_MAX_AVG_LOGP = -1e-6


def _log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    a = avg_logps.clamp(max=_MAX_AVG_LOGP)
    return a - torch.log(-torch.expm1(a))


@register
class ORPOLoss(PreferenceLoss):
    name = "orpo"
    needs_reference = False
    reduction = "mean"

    def __init__(self, beta: float = 0.1):
        check_beta(beta, "beta (ORPO's λ)")
        self.beta = beta

    def compute(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> LossOutput:
        del ref_chosen_logps, ref_rejected_logps  # reference-free by construction
        odds_ratio_loss = -F.logsigmoid(_log_odds(policy_chosen_logps) - _log_odds(policy_rejected_logps))
        losses = -policy_chosen_logps + self.beta * odds_ratio_loss
        return LossOutput(losses, (self.beta * policy_chosen_logps).detach(),
                          (self.beta * policy_rejected_logps).detach())
