"""``preftune dpo``: build the pieces, define the DPO step, call ``fit``, save the policy."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.config import Config
from preftune.errors import InputError
from preftune.data.collate import collate_pairs
from preftune.data.records import read_preference_pairs
from preftune.data.tokenize import TokenizedPair, TruncationStats, tokenize_pair
from preftune.losses import PreferenceLoss, get_loss
from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
from preftune.models.logprobs import SequenceLogps, sequence_logps
from preftune.models.reference import FrozenReference
from preftune.train.common import pick_device, resolve_precision, save_model, setup_threads, split_eval
from preftune.train.loop import StepOutput, fit
from preftune.train.rundir import make_run_dir, read_metrics

log = logging.getLogger(__name__)


def loss_from_config(cfg: Config) -> PreferenceLoss:
    return get_loss(cfg.dpo.loss, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)


def load_tokenized_pairs(cfg: Config, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Read, validate and tokenise the train and eval pairs; report skipped rows and truncation."""
    if not cfg.data.train:
        raise InputError("no training data: set data.train=PATH")
    out = []
    for path in (cfg.data.train, cfg.data.eval):
        if not path:
            out.append([])
            continue
        pairs, report = read_preference_pairs(path, on_invalid=cfg.data.on_invalid, limit=cfg.data.limit)
        if report.skipped:
            log.warning("%s: %s", path, report.summary())
        stats = TruncationStats()
        tokenized = [tokenize_pair(tokenizer, p, max_length=cfg.data.max_length,
                                   max_prompt_tokens=cfg.data.max_prompt_tokens,
                                   prompt_overflow=cfg.data.prompt_overflow,
                           append_eos=cfg.data.append_eos, stats=stats) for p in pairs]
        if stats.prompts_truncated or stats.responses_truncated:
            log.warning("%s: %s", path, stats.summary())
        out.append(tokenized)
    train, evals = out
    if not evals and cfg.data.eval_fraction > 0:
        train, evals = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
    return train, evals


def policy_logps(policy: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SequenceLogps:
    """One concatenated forward over the stacked chosen and rejected rows."""
    return sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])


def _reduce_logps(out: SequenceLogps, reduction: str) -> torch.Tensor:
    return out.mean() if reduction == "mean" else out.logps


@dataclass
class DPOOutputs:
    losses: torch.Tensor  # (B,)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]


def dpo_forward(policy: torch.nn.Module, reference: FrozenReference | None, loss_fn: PreferenceLoss,
                batch: dict[str, torch.Tensor]) -> DPOOutputs:
    """Per-pair losses and the field's metrics as (sum, count) for a stacked batch of B pairs."""
    n = batch["input_ids"].shape[0] // 2
    pol = policy_logps(policy, batch)
    pol_red = _reduce_logps(pol, loss_fn.reduction)
    ref_c = ref_r = None
    if loss_fn.needs_reference:
        assert reference is not None, f"loss {loss_fn.name} needs a reference"
        ref_red = _reduce_logps(reference.logps(batch), loss_fn.reduction)
        ref_c, ref_r = ref_red[:n], ref_red[n:]
    out = loss_fn(pol_red[:n], pol_red[n:], ref_c, ref_r)
    count = torch.tensor(float(n), device=out.losses.device)
    chosen_logps, rejected_logps = pol.logps[:n].detach(), pol.logps[n:].detach()
    stats = {
        "loss": (out.losses.detach().sum(), count),
        "rewards/chosen": (out.chosen_rewards.sum(), count),
        "rewards/rejected": (out.rejected_rewards.sum(), count),
        "rewards/accuracies": ((out.chosen_rewards > out.rejected_rewards).float().sum(), count),
        "rewards/margins": ((out.chosen_rewards - out.rejected_rewards).sum(), count),
        "logps/chosen": (chosen_logps.sum(), count),
        "logps/rejected": (rejected_logps.sum(), count),
    }
    return DPOOutputs(out.losses, stats)


def dpo_step(policy, reference, loss_fn, batch) -> StepOutput:
    result = dpo_forward(policy, reference, loss_fn, batch)
    return StepOutput(loss=result.losses.sum(), stats=result.stats,
                      tokens=int(batch["attention_mask"].sum()), pairs=int(batch["input_ids"].shape[0] // 2))


@torch.no_grad()
def evaluate_pairs(policy, reference, loss_fn, items: list[TokenizedPair], pad_id: int, batch_size: int,
                   device: torch.device) -> dict[str, float]:
    """Held-out preference metrics, averaged exactly over all pairs."""
    was_training = policy.training
    policy.eval()
    acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(items[start:start + batch_size], pad_id).items()}
        for name, (s, c) in dpo_forward(policy, reference, loss_fn, batch).stats.items():
            acc[name] = (acc[name][0] + s, acc[name][1] + c) if name in acc else (s, c)
    policy.train(was_training)
    return {name: (s / c).item() for name, (s, c) in acc.items()}


def run_dpo(cfg: Config, *, resume: bool = False) -> dict:
    """Train a policy with DPO; returns a summary dict (run_dir, final metrics)."""
    setup_threads(cfg)
    loss_fn = loss_from_config(cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_tokenized_pairs(cfg, tokenizer)
    run_dir = Path(cfg.run.dir) if resume else make_run_dir(cfg, "dpo")
    device = pick_device()
    precision = resolve_precision(cfg, device)
    log.info("DPO on %s: %d train / %d eval pairs, device=%s precision=%s, loss=%s", cfg.model,
             len(train_items), len(eval_items), device, precision, loss_fn.name)
    policy = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code).to(device)
    reference = None
    if loss_fn.needs_reference:
        ref_model = load_reference(cfg.ref_model or cfg.model, seed=cfg.train.seed,
                                   trust_remote_code=cfg.trust_remote_code).to(device)
        reference = FrozenReference(ref_model)
    pad_id = tokenizer.pad_token_id
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_pairs, policy, reference, loss_fn, eval_items, pad_id,
                                    cfg.train.eval_batch_size, device)
    result = fit(
        model=policy, items=train_items, collate=functools.partial(collate_pairs, pad_id=pad_id),
        step_fn=functools.partial(dpo_step, policy, reference, loss_fn),
        weight_fn=lambda b: float(b["n_pairs"]), cfg=cfg.train, run_dir=run_dir, eval_fn=eval_fn,
        resume=resume, device=device, precision=precision,
    )
    save_model(policy, tokenizer, run_dir / "policy")
    if cfg.run.plot:
        from preftune.eval.plots import plot_training

        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", kind="dpo")
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval}
