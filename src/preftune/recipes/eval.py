"""``preftune eval``: held-out preference metrics of a trained model against its reference."""

from __future__ import annotations

import json
from pathlib import Path

from preftune.config import Config, config_help
from preftune.errors import InputError
from preftune.recipes.common import FORMATTER, add_config_args, load_run_config, print_result



def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out preference metrics of a model against its reference",
                       description="Evaluate `model` against `ref_model` on data.eval pairs, or on data.train's "
                                   "(with data.eval_fraction > 0: the fraction a training run with the same "
                                   "config and train.seed held out): loss, implicit rewards, preference accuracy, "
                                   "margins.",
                       epilog=config_help(Config), formatter_class=FORMATTER)
    add_config_args(p)
    p.add_argument("--out", help="write the metrics as JSON here")
    p.set_defaults(func=lambda args: print_result(run(load_run_config(args.args, None, Config), out=args.out)))


def reference_spec(cfg: Config, mode: str) -> str | None:
    """The reference is named explicitly, never guessed from the policy (which may be the trained model):
    ``ref_model``, or for an adapter run the adapter's own base model."""
    from preftune.models.lora import base_of, is_adapter_dir

    if mode == "none":
        return None
    if cfg.ref_model:
        return cfg.ref_model
    if mode == "adapter" and is_adapter_dir(cfg.model):
        return base_of(cfg.model)[0]
    raise InputError("set ref_model=... (the reference the policy was trained against)")


def run(cfg: Config, *, out: str | None = None) -> dict:
    """Metrics of ``cfg.model`` vs its reference on ``data.eval`` (or ``data.train``)."""
    if cfg.run.report_to != "none":
        from preftune.errors import ConfigError

        raise ConfigError("run.report_to applies to training (dpo, sft, reward, ppo); preftune eval reports to no "
                          "tracker: remove it")
    from preftune.data.splits import load_file, pair_reader, split_eval
    from preftune.data.tokenize import tokenize_pair
    from preftune.models.load import check_reference_tokenizer, load_causal_lm, load_tokenizer
    from preftune.models.reference import FrozenReference, PrecomputedReference
    from preftune.train.objectives import evaluate_pairs, loss_from_config
    from preftune.train.policy import precompute_reference, reference_loader, resolve_reference_mode
    from preftune.train.runtime import pick_device, resolve_precision, setup_threads

    setup_threads(cfg)
    path = cfg.data.eval or cfg.data.train
    if not path:
        raise InputError("no evaluation data: set data.eval=PATH")
    loss_fn = loss_from_config(cfg)
    mode = resolve_reference_mode(cfg, loss_fn)
    ref_spec = reference_spec(cfg, mode)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if mode in ("model", "precomputed"):
        check_reference_tokenizer(tokenizer, ref_spec, cfg.model, trust_remote_code=cfg.trust_remote_code)
    items, report = load_file(cfg, path, pair_reader(cfg), tokenize_pair, tokenizer, role="evaluation")
    held_out = not cfg.data.eval and cfg.data.eval_fraction > 0
    if held_out:  # the pairs a training run with this config held out of data.train (the same split)
        items = split_eval(items, cfg.data.eval_fraction, cfg.train.seed, source=path)[1]
    device = pick_device(cfg)
    precision = resolve_precision(cfg, device)
    reference = None
    if mode == "precomputed":
        items = precompute_reference(cfg, ref_spec, {"eval": items}, tokenizer, device, precision)["eval"]
        reference = PrecomputedReference()
    elif mode in ("model", "adapter"):
        reference = FrozenReference(reference_loader(cfg, ref_spec)().to(device), precision)
    policy = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code).to(device)
    metrics = evaluate_pairs(policy, reference, loss_fn, items, tokenizer.pad_token_id, cfg.train.eval_batch_size,
                             device, cfg.dpo.sft_weight, precision)
    result = {"model": cfg.model, "ref_model": ref_spec, "reference_mode": mode, "data": str(path),
              **({"held_out_fraction": cfg.data.eval_fraction} if held_out else {}), "pairs": len(items),
              "skipped": report.skipped, **{f"eval/{k}": v for k, v in metrics.items()}}
    if out:
        Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


CONFIG = Config  # this command's config (configs/*.yaml that name `command: eval` parse with it)
