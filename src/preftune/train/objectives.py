"""What one step computes for each objective the ``fit`` loop trains, and the held-out evaluation of each:
DPO and its family (``dpo_*``), supervised fine-tuning (``sft_*``) and the Bradley-Terry reward model
(``reward_*``). A ``*_forward`` returns losses and the field's metrics as (sum, count) pairs; a ``*_step`` wraps it
for ``fit`` (the loss SUMMED over the micro-batch's units, which ``fit`` divides by the step's total weight).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from preftune.config import Config
from preftune.data.collate import collate_examples, collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.errors import ConfigError
from preftune.losses import PreferenceLoss, get_loss, loss_params
from preftune.models.logprobs import SequenceLogps, module_logps
from preftune.train.distributed import Processes
from preftune.train.evaluate import evaluate
from preftune.train.loop import StepOutput
from preftune.train.metrics import Stats

# ---------------------------------------------------------------- DPO and its family


def loss_from_config(cfg: Config) -> PreferenceLoss:
    """The configured loss. An option the chosen loss does not take is refused, never silently ignored."""
    accepted = loss_params(cfg.dpo.loss)
    params = {"beta": cfg.dpo.beta}
    optional = {"label_smoothing": cfg.dpo.label_smoothing or None, "gamma": cfg.dpo.gamma,
                "average_log_probs": cfg.dpo.average_log_probs}
    for name, value in optional.items():
        if value is None:
            continue
        if name not in accepted:
            raise ConfigError(f"config key 'dpo.{name}' is set but loss '{cfg.dpo.loss}' does not use it")
        params[name] = value
    return get_loss(cfg.dpo.loss, **params)


def _reduce_logps(out: SequenceLogps, reduction: str) -> torch.Tensor:
    return out.mean() if reduction == "mean" else out.logps


@dataclass
class DPOOutputs:
    losses: torch.Tensor  # (B,)
    stats: Stats


def dpo_forward(policy: torch.nn.Module, reference, loss_fn: PreferenceLoss, batch: dict[str, torch.Tensor],
                sft_weight: float = 0.0) -> DPOOutputs:
    """Per-pair losses and the field's metrics as (sum, count) for a stacked batch of B pairs.
    ``sft_weight`` > 0 adds the length-averaged NLL of each chosen response (RPO-style), for any loss."""
    n = int(batch["n_pairs"])
    pol = module_logps(policy, batch)
    pol_red = _reduce_logps(pol, loss_fn.reduction)
    ref_c = ref_r = None
    if loss_fn.needs_reference:
        assert reference is not None, f"loss {loss_fn.name} needs a reference"
        ref_red = _reduce_logps(reference.logps(batch), loss_fn.reduction)
        ref_c, ref_r = ref_red[:n], ref_red[n:]
    out = loss_fn(pol_red[:n], pol_red[n:], ref_c, ref_r)
    losses = out.losses
    nll = -pol.logps[:n] / pol.n_tokens[:n].clamp(min=1)
    if sft_weight:
        losses = losses + sft_weight * nll
    count = torch.tensor(float(n), device=out.losses.device)
    chosen_logps, rejected_logps = pol.logps[:n].detach(), pol.logps[n:].detach()
    stats = {
        "loss": (losses.detach().sum(), count),
        "nll/chosen": (nll.detach().sum(), count),
        "rewards/chosen": (out.chosen_rewards.sum(), count),
        "rewards/rejected": (out.rejected_rewards.sum(), count),
        "rewards/accuracies": ((out.chosen_rewards > out.rejected_rewards).float().sum(), count),
        "rewards/margins": ((out.chosen_rewards - out.rejected_rewards).sum(), count),
        "logps/chosen": (chosen_logps.sum(), count),
        "logps/rejected": (rejected_logps.sum(), count),
    }
    return DPOOutputs(losses, stats)


def dpo_step(policy, reference, loss_fn, sft_weight, batch) -> StepOutput:
    result = dpo_forward(policy, reference, loss_fn, batch, sft_weight)
    return StepOutput(loss=result.losses.sum(), stats=result.stats,
                      tokens=int(batch["n_positions"]), pairs=int(batch["n_pairs"]))


def pair_weight(batch: dict[str, torch.Tensor]) -> float:
    """A preference batch's weight in its step: its pair count (DPO and the reward model average over pairs)."""
    return float(batch["n_pairs"])


def evaluate_pairs(policy, reference, loss_fn, items: list[TokenizedPair], pad_id: int, batch_size: int,
                   device: torch.device, sft_weight: float = 0.0, precision: str = "fp32",
                   collate=collate_pairs, procs: Processes | None = None) -> dict[str, float]:
    """Held-out preference metrics, averaged exactly over all pairs, under the training precision (so that
    precomputed reference log-probs and live ones agree); shared out over several processes."""
    return evaluate(policy, lambda batch: dpo_forward(policy, reference, loss_fn, batch, sft_weight).stats, items,
                    functools.partial(collate, pad_id=pad_id), batch_size, device, precision, procs)


# ---------------------------------------------------------------- supervised fine-tuning
# The loss is the mean negative log-likelihood over ALL completion tokens of an optimizer step (the loop divides
# the summed NLL by the step's token count), so gradient accumulation does not change it.


def sft_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over completion tokens, token count)."""
    out = module_logps(model, batch)
    return -out.logps.sum(), out.n_tokens.sum()


def sft_step(model, batch) -> StepOutput:
    nll, n_tokens = sft_forward(model, batch)
    return StepOutput(loss=nll, stats={"loss": (nll.detach(), n_tokens)},
                      tokens=int(batch["n_positions"]), pairs=int(batch["input_ids"].shape[0]))


def token_weight(batch: dict[str, torch.Tensor]) -> float:
    """An SFT batch's weight in its step: its completion-token count."""
    return float((batch["labels"][:, 1:] != -100).sum())


def evaluate_examples(model, items, pad_id: int, batch_size: int, device: torch.device,
                      procs: Processes | None = None) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity; shared out over several processes. In fp32 whatever the training
    precision, as SFT has always measured it (perplexities compare across runs of any precision)."""
    if not items:
        return {"loss": 0.0, "perplexity": 1.0}

    def forward(batch):
        nll, n_tokens = sft_forward(model, batch)
        return {"loss": (nll, n_tokens)}

    loss = evaluate(model, forward, items, functools.partial(collate_examples, pad_id=pad_id), batch_size, device,
                    "fp32", procs)["loss"]
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


# ---------------------------------------------------------------- the Bradley-Terry reward model
# The loss per pair is -log σ(r(x, y_w) - r(x, y_l)) (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020). Metrics:
# ``loss``, ``accuracy`` (r_w > r_l, ties count as wrong), ``rewards/chosen``, ``rewards/rejected``,
# ``rewards/margins`` (raw rewards).


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(B,) -log σ(r_w - r_l) for (B,) rewards, computed stably (logsigmoid)."""
    assert chosen_rewards.shape == rejected_rewards.shape and chosen_rewards.dim() == 1
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards)


def reward_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    """Per-pair losses (B,) and (sum, count) metrics for a stacked (2B, T) batch: one forward over all rows."""
    n = batch["input_ids"].shape[0] // 2
    rewards = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
    chosen, rejected = rewards[:n], rewards[n:]
    losses = bradley_terry_loss(chosen, rejected)
    c, r = chosen.detach(), rejected.detach()
    count = torch.tensor(float(n), device=rewards.device)
    stats = {
        "loss": (losses.detach().sum(), count),
        "accuracy": ((c > r).float().sum(), count),
        "rewards/chosen": (c.sum(), count),
        "rewards/rejected": (r.sum(), count),
        "rewards/margins": ((c - r).sum(), count),
    }
    return losses, stats


def reward_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    losses, stats = reward_forward(model, batch)
    return StepOutput(loss=losses.sum(), stats=stats, tokens=int(batch["n_positions"]),
                      pairs=int(batch["input_ids"].shape[0] // 2))


def evaluate_reward(model: torch.nn.Module, items: list[TokenizedPair], pad_id: int, batch_size: int,
                    device: torch.device, precision: str = "fp32", procs: Processes | None = None) -> dict[str, float]:
    """Held-out pairwise metrics, averaged exactly over all pairs, under the training precision; shared out over
    several processes."""
    return evaluate(model, lambda batch: reward_forward(model, batch)[1], items,
                    functools.partial(collate_pairs, pad_id=pad_id), batch_size, device, precision, procs)
