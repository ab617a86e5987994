"""``preftune dpo``: build the pieces, define the DPO step, call ``fit``, save the policy."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.config import Config, ConfigError
from preftune.data.collate import batch_to, collate_pairs, pair_collator
from preftune.data.records import read_preference_pairs
from preftune.data.tokenize import TokenizedPair, tokenize_pair
from preftune.losses import PreferenceLoss, get_loss, loss_params
from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
from preftune.models.logprobs import LogpsModule, SequenceLogps, autocast_context, module_logps
from preftune.models.lora import apply_lora
from preftune.models.reference import (AdapterReference, FrozenReference, PrecomputedReference, precompute,
                                       weights_identity)
from preftune.train.common import load_splits, prepare_for_training, resolve_precision, save_policy, setup_threads
from preftune.train.distributed import Processes
from preftune.train.layout import resolve_layout
from preftune.train.loop import StepOutput, fit
from preftune.train.rundir import read_metrics

log = logging.getLogger(__name__)
Reference = FrozenReference | AdapterReference | PrecomputedReference


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


def pair_reader(cfg: Config):
    """``read(path) -> (pairs, SkipReport)`` under ``cfg.data``'s validation settings."""
    d = cfg.data
    return functools.partial(read_preference_pairs, on_invalid=d.on_invalid, limit=d.limit,
                             max_pairs_per_prompt=d.max_pairs_per_prompt)


def load_tokenized_pairs(cfg: Config, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Read, validate and tokenise the train and eval pairs; report skipped rows and truncation."""
    return load_splits(cfg, pair_reader(cfg), tokenize_pair, tokenizer)


def _reduce_logps(out: SequenceLogps, reduction: str) -> torch.Tensor:
    return out.mean() if reduction == "mean" else out.logps


@dataclass
class DPOOutputs:
    losses: torch.Tensor  # (B,)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]


def dpo_forward(policy: torch.nn.Module, reference: Reference | None, loss_fn: PreferenceLoss,
                batch: dict[str, torch.Tensor], sft_weight: float = 0.0) -> DPOOutputs:
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


@torch.no_grad()
def evaluate_pairs(policy, reference, loss_fn, items: list[TokenizedPair], pad_id: int, batch_size: int,
                   device: torch.device, sft_weight: float = 0.0, precision: str = "fp32",
                   collate=collate_pairs, procs: Processes | None = None) -> dict[str, float]:
    """Held-out preference metrics, averaged exactly over all pairs, under the training precision (so that
    precomputed reference log-probs and live ones agree); shared out over several processes."""
    procs = procs if procs is not None else Processes()
    items, shared = procs.eval_shard(items)
    was_training = policy.training
    policy.eval()
    acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        batch = batch_to(collate(items[start:start + batch_size], pad_id), device)
        with autocast_context(device, precision):
            stats = dpo_forward(policy, reference, loss_fn, batch, sft_weight).stats
        for name, (s, c) in stats.items():
            acc[name] = (acc[name][0] + s, acc[name][1] + c) if name in acc else (s, c)
    policy.train(was_training)
    acc = procs.sum_stats(acc) if shared else acc
    return {name: (s / c).item() for name, (s, c) in acc.items()}


def resolve_reference_mode(cfg: Config, loss_fn: PreferenceLoss) -> str:
    mode = cfg.reference.mode
    if not loss_fn.needs_reference:
        if mode not in ("none", "model"):
            raise ConfigError(f"loss '{loss_fn.name}' is reference-free: set reference.mode=none, not {mode!r}")
        return "none"
    if mode == "none":
        raise ConfigError(f"loss '{loss_fn.name}' needs a reference: reference.mode=none only suits simpo/orpo")
    if mode == "adapter" and cfg.ref_model not in (None, cfg.model):
        raise ConfigError("reference.mode=adapter: the reference is the policy's own base weights, so ref_model "
                          "cannot name another model (use reference.mode=model or precomputed)")
    return mode


def reference_loader(cfg: Config, ref_spec: str):
    """A function that loads the frozen reference named by ``ref_spec`` (called only when it is needed)."""
    return functools.partial(load_reference, ref_spec, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)


def precompute_reference(cfg: Config, ref_spec: str, splits: dict[str, list], tokenizer, device: torch.device,
                         precision: str) -> dict[str, list]:
    """``splits`` with cached reference log-probs attached (``reference.mode=precomputed``); the cache key
    covers the reference weights, tokenizer, template, truncation settings, precision and the data."""
    d = cfg.data
    settings = {"max_length": d.max_length, "max_prompt_tokens": d.max_prompt_tokens,
                "prompt_overflow": d.prompt_overflow, "append_eos": d.append_eos}
    return precompute(splits, load_model=reference_loader(cfg, ref_spec),
                      weights=weights_identity(ref_spec, cfg.train.seed), tokenizer=tokenizer, settings=settings,
                      pad_id=tokenizer.pad_token_id, batch_size=cfg.train.eval_batch_size, device=device,
                      precision=precision, root=Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else None)


def build_policy_and_reference(cfg: Config, loss_fn: PreferenceLoss, tokenizer, splits: dict[str, list],
                               device: torch.device, precision: str, procs: Processes | None = None
                               ) -> tuple[torch.nn.Module, Reference | None, dict]:
    """Load the policy (LoRA-wrapped when asked or implied) and the reference strategy. With ``precomputed``
    the reference log-probs are computed (or read from the cache) first, and the reference model is freed
    before the policy loads; of several processes, process 0 computes and caches them and the others then read
    the cache (on other machines without a shared cache directory they compute their own)."""
    procs = procs if procs is not None else Processes()
    mode = resolve_reference_mode(cfg, loss_fn)
    ref_spec = cfg.ref_model or cfg.model
    load_ref = reference_loader(cfg, ref_spec)
    if mode == "precomputed":
        if not procs.is_main:
            procs.barrier()  # wait for process 0's cache
        splits = precompute_reference(cfg, ref_spec, splits, tokenizer, device, precision)
        if procs.is_main:
            procs.barrier()
    policy = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora.enabled or mode == "adapter":
        policy = apply_lora(policy, cfg.lora, seed=cfg.train.seed)
    policy = prepare_for_training(policy.to(device), cfg)
    if cfg.train.compile:
        policy.get_decoder().compile()  # in place: parameter names (and checkpoints) are unchanged
    reference: Reference | None = {
        "model": lambda: FrozenReference(load_ref().to(device), precision),
        "adapter": lambda: AdapterReference(policy),
        "precomputed": PrecomputedReference,
        "none": lambda: None,
    }[mode]()
    log.info("reference: %s", mode)
    return policy, reference, splits


def run_dpo(cfg: Config, *, resume: bool = False) -> dict:
    """Train a policy with DPO (or a family member); returns a summary dict (run_dir, final metrics)."""
    setup_threads(cfg)
    loss_fn = loss_from_config(cfg)
    resolve_reference_mode(cfg, loss_fn)  # config errors before anything loads
    procs = Processes.from_env(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_tokenized_pairs(cfg, tokenizer)
    run_dir = procs.run_dir(cfg, "dpo", resume)
    device = procs.pick_device(cfg)
    precision = resolve_precision(cfg, device)
    policy, reference, splits = build_policy_and_reference(
        cfg, loss_fn, tokenizer, {"train": train_items, "eval": eval_items}, device, precision, procs)
    train_items, eval_items = splits["train"], splits["eval"]
    layout = resolve_layout(cfg, train_items + eval_items, model=policy)
    log.info("DPO on %s: %d train / %d eval pairs, device=%s precision=%s layout=%s loss=%s (change with "
             "train.precision / train.layout / dpo.loss)", cfg.model, len(train_items), len(eval_items), device,
             precision, layout, loss_fn.name)
    collate = pair_collator(layout)
    pad_id = tokenizer.pad_token_id
    sft_weight = cfg.dpo.sft_weight
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_pairs, policy, reference, loss_fn, eval_items, pad_id,
                                    cfg.train.eval_batch_size, device, sft_weight, precision, collate, procs)
    stepped = procs.wrap(LogpsModule(policy)) if procs.world > 1 else policy
    result = fit(
        model=policy, items=train_items, collate=functools.partial(collate, pad_id=pad_id),
        step_fn=functools.partial(dpo_step, stepped, reference, loss_fn, sft_weight),
        weight_fn=lambda b: float(b["n_pairs"]), cfg=cfg.train, run_dir=run_dir, eval_fn=eval_fn,
        resume=resume, device=device, precision=precision, procs=procs,
    )
    if procs.is_main and cfg.train.save_final:
        save_policy(cfg, policy, tokenizer, run_dir)
    procs.barrier()
    if procs.is_main and cfg.run.plot:
        from preftune.eval.plots import plot_training

        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", kind="dpo")
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval}
