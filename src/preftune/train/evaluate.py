"""``preftune eval``: held-out preference metrics of a trained model against its reference."""

from __future__ import annotations

import json
from pathlib import Path

from preftune.config import Config
from preftune.data.tokenize import TruncationStats, tokenize_pair
from preftune.data.records import read_preference_pairs
from preftune.errors import InputError
from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
from preftune.models.reference import FrozenReference
from preftune.train.common import pick_device, setup_threads
from preftune.train.dpo import evaluate_pairs, loss_from_config


def run_eval(cfg: Config, *, out: str | None = None) -> dict:
    """Metrics of ``cfg.model`` vs ``cfg.ref_model`` on ``data.eval`` (or ``data.train``)."""
    setup_threads(cfg)
    path = cfg.data.eval or cfg.data.train
    if not path:
        raise InputError("no evaluation data: set data.eval=PATH")
    if cfg.ref_model is None:
        raise InputError("set ref_model=... (the reference the policy was trained against)")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    pairs, report = read_preference_pairs(path, on_invalid=cfg.data.on_invalid, limit=cfg.data.limit)
    stats = TruncationStats()
    items = [tokenize_pair(tokenizer, p, max_length=cfg.data.max_length, max_prompt_tokens=cfg.data.max_prompt_tokens,
                           prompt_overflow=cfg.data.prompt_overflow,
                           append_eos=cfg.data.append_eos, stats=stats) for p in pairs]
    device = pick_device()
    loss_fn = loss_from_config(cfg)
    policy = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code).to(device)
    reference = None
    if loss_fn.needs_reference:
        reference = FrozenReference(load_reference(cfg.ref_model, seed=cfg.train.seed,
                                                   trust_remote_code=cfg.trust_remote_code).to(device))
    metrics = evaluate_pairs(policy, reference, loss_fn, items, tokenizer.pad_token_id, cfg.train.eval_batch_size,
                             device)
    result = {"model": cfg.model, "ref_model": cfg.ref_model, "data": str(path), "pairs": len(items),
              "skipped": report.skipped, **{f"eval/{k}": v for k, v in metrics.items()}}
    if out:
        Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
