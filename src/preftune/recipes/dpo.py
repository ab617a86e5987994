"""``preftune dpo``: train a policy on preference pairs with DPO or a member of its family."""

from __future__ import annotations

import functools
import logging

from preftune.config import Config
from preftune.recipes.common import finish_policy_run, refuse_idle_lora_settings, register_training, start_training_run

log = logging.getLogger(__name__)
HELP = "train a policy on preference pairs with DPO"



def register(sub) -> None:
    register_training(sub, "dpo", help=HELP, description=f"{HELP}.", config=Config, run=run)


def check_config(cfg: Config, command: str = "dpo") -> tuple:
    """Checked before anything loads (also by ``demo``, before it samples, for the DPO run it ends with): the loss,
    the reference mode it resolves to, LoRA settings that would go unused. Returns (loss, reference mode)."""
    from preftune.train.objectives import loss_from_config
    from preftune.train.policy import resolve_reference_mode

    loss_fn = loss_from_config(cfg)
    mode = resolve_reference_mode(cfg, loss_fn)
    refuse_idle_lora_settings(cfg, command, adapter=mode == "adapter")
    return loss_fn, mode


def run(cfg: Config, *, resume: bool = False) -> dict:
    """Train a policy with DPO (or a family member); returns a summary dict (run_dir, final metrics)."""
    from preftune.data.collate import pair_collator
    from preftune.data.splits import load_tokenized_pairs
    from preftune.models.load import check_reference_tokenizer, load_tokenizer
    from preftune.models.logprobs import LogpsModule
    from preftune.train.distributed import Processes, check_sharding
    from preftune.train.layout import resolve_layout
    from preftune.train.loop import fit
    from preftune.train.objectives import dpo_step, evaluate_pairs, pair_weight
    from preftune.train.policy import build_policy_and_reference
    from preftune.train.runtime import pick_device, resolve_precision, setup_threads

    setup_threads(cfg)
    loss_fn, mode = check_config(cfg)
    procs = Processes.from_env(cfg.train.device, cfg.train.sharding)
    check_sharding(procs, cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if mode in ("model", "precomputed"):
        check_reference_tokenizer(tokenizer, cfg.ref_model or cfg.model, cfg.model,
                                  trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items, run_dir = start_training_run(cfg, procs, "dpo", resume, load_tokenized_pairs, tokenizer)
    device = pick_device(cfg, procs)
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
    stepped = procs.wrap(LogpsModule(policy), cfg.train) if procs.world > 1 else policy
    if procs.sharding != "none" and hasattr(reference, "through"):  # the adapter reference: gathered weights
        reference.through(stepped)
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_pairs, procs.evaluated(policy), reference, loss_fn, eval_items, pad_id,
                                    cfg.train.eval_batch_size, device, sft_weight, precision, collate, procs)
    result = fit(
        model=policy, items=train_items, collate=functools.partial(collate, pad_id=pad_id),
        step_fn=functools.partial(dpo_step, stepped, reference, loss_fn, sft_weight),
        weight_fn=pair_weight, cfg=cfg.train, run_dir=run_dir, eval_fn=eval_fn,
        resume=resume, device=device, precision=precision, procs=procs,
    )
    finish_policy_run(procs, cfg, policy, tokenizer, run_dir, "dpo")
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval}


CONFIG = Config  # this command's config (configs/*.yaml that name `command: dpo` parse with it)
