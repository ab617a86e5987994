"""The policy about to be trained and the reference it is measured against: LoRA wrapping, training-only model
settings, and the reference strategy (a frozen copy, the adapter switched off, log-probs precomputed and cached,
or none for reference-free losses)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from preftune.config import Config
from preftune.errors import ConfigError
from preftune.losses import PreferenceLoss
from preftune.models.load import load_causal_lm, load_reference
from preftune.models.lora import apply_lora
from preftune.models.reference import (AdapterReference, FrozenReference, PrecomputedReference, precompute,
                                       weights_identity)
from preftune.train.distributed import Processes
from preftune.train.runtime import prepare_for_training

log = logging.getLogger(__name__)
Reference = FrozenReference | AdapterReference | PrecomputedReference


def resolve_reference_mode(cfg: Config, loss_fn: PreferenceLoss) -> str:
    mode = cfg.reference.mode
    if not loss_fn.needs_reference:
        if mode not in ("none", "model"):
            raise ConfigError(f"loss '{loss_fn.name}' is reference-free: set reference.mode=none, not {mode!r}")
        if cfg.ref_model not in (None, cfg.model):
            raise ConfigError(f"config key 'ref_model': loss '{loss_fn.name}' is reference-free and reads no "
                              "reference: remove it")
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
                         precision: str, procs: Processes | None = None) -> dict[str, list]:
    """``splits`` with cached reference log-probs attached (``reference.mode=precomputed``); the cache key
    covers the reference weights, tokenizer, template, truncation settings, precision and the data."""
    d = cfg.data
    settings = {"max_length": d.max_length, "max_prompt_tokens": d.max_prompt_tokens,
                "prompt_overflow": d.prompt_overflow, "append_eos": d.append_eos}
    return precompute(splits, load_model=reference_loader(cfg, ref_spec),
                      weights=weights_identity(ref_spec, cfg.train.seed), tokenizer=tokenizer, settings=settings,
                      pad_id=tokenizer.pad_token_id, batch_size=cfg.train.eval_batch_size, device=device,
                      precision=precision, root=Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else None,
                      procs=procs if procs is not None and procs.world > 1 else None,
                      prepare=_sharded_logps_module(procs))


def _sharded_logps_module(procs: Processes | None):
    """Under FSDP2 or ZeRO, the reference for precomputing is sharded like the one a live run holds."""
    if procs is None or procs.sharding == "none":
        return None
    from preftune.models.logprobs import LogpsModule

    return lambda model: procs.shard_frozen(LogpsModule(model.eval().requires_grad_(False)))


def build_policy_and_reference(cfg: Config, loss_fn: PreferenceLoss, tokenizer, splits: dict[str, list],
                               device: torch.device, precision: str, procs: Processes | None = None
                               ) -> tuple[torch.nn.Module, Reference | None, dict]:
    """Load the policy (LoRA-wrapped when asked or implied) and the reference strategy. With ``precomputed``
    the reference log-probs are computed (or read from the cache) first, and the reference model is freed
    before the policy loads; several processes each compute a share, process 0 caches the whole."""
    procs = procs if procs is not None else Processes()
    mode = resolve_reference_mode(cfg, loss_fn)
    ref_spec = cfg.ref_model or cfg.model
    load_ref = reference_loader(cfg, ref_spec)
    if mode == "precomputed":  # every process computes its share (models.reference.precompute)
        splits = precompute_reference(cfg, ref_spec, splits, tokenizer, device, precision, procs)
    policy = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora.enabled or mode == "adapter":
        policy = apply_lora(policy, cfg.lora, seed=cfg.train.seed)
    policy = prepare_for_training(policy.to(procs.load_device(device)), cfg, procs)
    reference: Reference | None = {
        "model": lambda: FrozenReference(load_ref().to(procs.load_device(device)), precision,
                                         procs.shard_frozen if procs.sharding != "none" else None),
        "adapter": lambda: AdapterReference(policy),
        "precomputed": PrecomputedReference,
        "none": lambda: None,
    }[mode]()
    log.info("reference: %s", mode)
    return policy, reference, splits
