"""PPO for RLHF as pure functions on tensors (no model, no optimizer): every one is tested against numbers
computed by hand in ``tests/unit/test_ppo_math.py``.

Layout: per-token tensors are ``(B, T)`` over COMPLETION tokens only (the prompt never appears), with a
``mask`` ``(B, T)`` that is 1 at real completion tokens and 0 at padding. Position t of row b is the t-th
sampled token of sample b; its value V[b, t] is the value of the state before that token was sampled.
Nothing at a masked position ever reaches an output (padding may hold any finite or non-finite garbage).

The recipe is the one of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as
implemented in OpenAI's lm-human-preferences and TRL: a per-token KL penalty plus the scalar score at the
last token, GAE (Schulman et al. 2016), whitened advantages, the clipped surrogate objective and a clipped
value loss (Schulman et al. 2017), and a fixed or adaptive KL coefficient.
"""

from __future__ import annotations

import torch


def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool() if mask.dtype != torch.bool else mask


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is set (masked positions count as 0, even if NaN)."""
    kept = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked-in positions (0 where there are none)."""
    count = _bool(mask).sum() if dim is None else _bool(mask).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Variance over all masked-in positions, with Bessel's correction n/(n-1) (as TRL's ``masked_var``);
    with fewer than 2 positions the (biased) variance 0 is returned."""
    mean = masked_mean(x, mask)
    n = _bool(mask).sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (unbiased) variance taken over masked-in positions of
    the whole tensor; ``shift_mean=False`` adds the mean back (only the scale changes, as the reference
    implementations do for rewards). Shapes: x, mask (B, T) -> (B, T), 0 at masked positions."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_bool(mask), out, torch.zeros((), dtype=out.dtype, device=out.device))


def to_grid(flat: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-token values of a packed batch -> the (B, T) completion layout. ``flat`` (N,) holds row 0's tokens in
    order, then row 1's, ... and ``rows`` (N,) the (non-decreasing) row of each, as ``token_logps`` returns them.
    Row b's k-th token lands at [b, k]; the rest is 0. Differentiable in ``flat``."""
    counts = torch.bincount(rows, minlength=shape[0])
    cols = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    return flat.new_zeros(shape).index_put((rows, cols), flat)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last masked-in position of each row of a (B, T) mask; every row needs one."""
    m = _bool(mask)
    assert bool(m.any(dim=1).all()), "every row needs at least one completion token"
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).max(dim=1).values


def kl_shaped_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``-kl_coef * (log pi - log pi_ref)`` at every completion token, plus the scalar
    ``score`` at each row's LAST completion token (Ziegler et al. 2019, eq. 2, spread over tokens).

    Shapes: score (B,); logprobs, ref_logprobs, mask (B, T) -> rewards (B, T), 0 at masked positions.
    """
    assert score.shape == (logprobs.shape[0],) and logprobs.shape == ref_logprobs.shape == mask.shape
    rewards = -kl_coef * (logprobs - ref_logprobs)
    rewards = torch.where(_bool(mask), rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last_token_index(mask)), score.to(rewards.dtype), accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), bootstrapping V = 0 after each row's last token:

        delta_t = r_t + gamma * V_{t+1} - V_t,      A_t = delta_t + gamma * lam * A_{t+1},      R_t = A_t + V_t

    where t+1 is the next MASKED-IN position of the row (padding is skipped, so left- or right-padded rows
    give the same numbers) and V, A after the last one are 0. Shapes: rewards, values, mask (B, T) ->
    (advantages (B, T), returns (B, T)), both 0 at masked positions. No gradient flows (values are targets).
    """
    assert rewards.shape == values.shape == mask.shape
    m = _bool(mask)
    rewards, values = rewards.detach(), values.detach()
    zero = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value, next_adv = zero, zero
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m[:, t], adv, zero)
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_adv = torch.where(m[:, t], adv, next_adv)
    returns = torch.where(m, advantages + values, torch.zeros((), dtype=values.dtype, device=values.device))
    return advantages, returns


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise, averaged over all
    masked-in tokens of the batch:  mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps)),
    r_t = exp(log pi - log pi_old).

    Returns ``(loss, clip_fraction, approx_kl)``, all scalars:
    - ``clip_fraction``: share of tokens where the clipped term is the larger one (its gradient is 0), as TRL;
    - ``approx_kl``: mean over tokens of 1/2 (log r_t)^2 (the estimator of TRL's PPOTrainer; Schulman's "k2"),
      an estimate of KL(pi_old || pi) that is >= 0 per token. Both carry no gradient.
    Shapes: logprobs, old_logprobs, advantages, mask (B, T).
    """
    assert logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape
    m = _bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero)  # 0 at padding: no inf/NaN from garbage
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach(), zero)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), m).detach()
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, m)
    return loss, clip_fraction, approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)^2), the clipped value
    loss of the PPO reference implementations (OpenAI baselines, TRL). Returns ``(loss, value_clip_fraction)``,
    the fraction being the share of tokens where the clipped term is the larger one.
    Shapes: values, old_values, returns, mask (B, T)."""
    assert values.shape == old_values.shape == returns.shape == mask.shape
    m = _bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values, old_values = torch.where(m, values, zero), torch.where(m, old_values.detach(), zero)
    returns = torch.where(m, returns.detach(), zero)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), m)
    fraction = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), m).detach()
    return loss, fraction


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax over the last dim, in fp32: logits (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over masked-in positions: logits (B, T, V), mask (B, T) -> scalar."""
    assert logits.shape[:-1] == mask.shape
    return masked_mean(token_entropy(logits), mask)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, Sec. 2.2: after each batch,
    ``kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``,
    where KL is the batch's mean sequence KL and n_steps the number of samples in the batch."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
