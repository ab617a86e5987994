"""What every recipe's command line shares: the optional YAML and the ``key=value`` overrides, the one
``--resume`` rule, and printing a run's summary."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from preftune.config import load_config
from preftune.errors import ConfigError

log = logging.getLogger(__name__)
FORMATTER = argparse.RawDescriptionHelpFormatter
RESUME_RULE = ("--resume RUN_DIR continues the run in RUN_DIR from its last checkpoint, with the config saved there\n"
               "(RUN_DIR/config.yaml); overrides may only extend or observe it (train.max_steps, ppo.iterations, the\n"
               "log/eval/save cadence, threads, plots; they are recorded there); one that changes what is trained is\n"
               "refused, and so is a YAML file.")
# keys an override may change on --resume: they extend the run or change how it is observed, not what it computes
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.eval_batch_size", "train.progress", "train.num_threads", "train.max_skipped_steps", "train.save_final",
    "ppo.iterations", "ppo.eval_every", "ppo.save_every", "run.plot", "run.dir"})


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(the first ``*.yaml``/``*.yml`` argument without ``=``, the other arguments as overrides)."""
    path = None
    overrides = []
    for a in args:
        if "=" not in a and a.endswith((".yaml", ".yml")) and path is None:
            path = a
        else:
            overrides.append(a)
    return path, overrides


def add_config_args(p: argparse.ArgumentParser, resume: bool = False) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config, then dotted overrides (see below)")
    if resume:
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint, "
                                                           "with its saved config (overrides apply; no YAML)")


def load_run_config(args: list[str], resume: str | None, new: Callable[[], Any], *,
                    check: Callable[[Any], None] | None = None) -> Any:
    """The one config rule of every command: defaults (``new()``) <- YAML <- overrides. With ``--resume RUN_DIR``:
    RUN_DIR/config.yaml <- overrides, and the run continues in RUN_DIR (wherever the saved config's run.dir
    pointed: a copied run directory must not write into its original); a YAML file given as well is refused
    rather than silently dropped. ``check(cfg)``: the command's own checks, before anything loads."""
    path, overrides = split_config_args(args)
    if not resume:
        cfg = load_config(path, overrides, base=new())
    else:
        if path is not None:
            raise ConfigError(f"--resume takes its config from {resume}/config.yaml; pass overrides only, "
                              f"not {path}")
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {resume}: no config.yaml there (not a run directory)")
        cfg = load_config(saved, [*overrides, f"run.dir={resume}"], base=new(), skip_defaults=True)
        _check_resume_overrides(saved, overrides, cfg, new)
    if check is not None:
        check(cfg)
    return cfg


def _check_resume_overrides(saved: Path, overrides: list[str], cfg: Any, new: Callable[[], Any]) -> None:
    """Refuse overrides that would change what a resumed run computes (model, data, loss, beta, lr, batch shape,
    seed...): a run continued under other settings is neither the old run nor a new one. Keys that only extend or
    observe it (``RESUMABLE_KEYS``) are allowed; an override equal to the saved value is harmless."""
    before = load_config(saved, base=new(), skip_defaults=True)
    changed = []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in RESUMABLE_KEYS:
            continue
        old, now = _lookup(before, key), _lookup(cfg, key)
        if old != now:
            changed.append(f"{key} (saved {old!r}, given {now!r})")
    if changed:
        raise ConfigError(f"--resume {saved.parent}: these overrides change what the run trains: {', '.join(changed)}; "
                          f"start a new run for them (only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume)")


def _lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def refuse_unread(cfg: Any, command: str, keys: dict[str, str]) -> None:
    """Keys (``section`` or ``section.field``) that ``command``'s config accepts, sharing a section or a base with
    other commands, but that the command does not read: set to anything but their default, each is an error that
    names the key and says why (``keys[key]``), never a value silently ignored."""
    import dataclasses

    defaults = type(cfg)()
    for key, why in keys.items():
        value, default = _lookup(cfg, key), _lookup(defaults, key)
        changed = ([f"{key}.{f.name}" for f in dataclasses.fields(value)
                    if getattr(value, f.name) != getattr(default, f.name)]
                   if dataclasses.is_dataclass(value) else [key] if value != default else [])
        if changed:
            raise ConfigError(f"config key '{changed[0]}': preftune {command} does not read it ({why}); remove it")


def refuse_what_the_arms_do_not_take(cfg: Any, command: str, reference: str, more: dict[str, str]) -> None:
    """An experiment's (frontier, winrate) refusals: keys of the training config its arms share that no arm takes
    (the arms set their own loss, reference and sections), plus the experiment's ``more``."""
    refuse_unread(cfg, command, {
        "dpo": f"its DPO arms use the sigmoid loss at each beta of {command}.dpo_betas",
        "reference": f"every arm is held against {reference}, a frozen copy", "lora": "its arms train every weight",
        "ref_model": f"every arm's reference is {reference}", "run.report_to": "its runs report to no tracker",
        "train.save_final": "its arms' final models are used", **more})


def refuse_idle_lora_settings(cfg: Any, command: str, adapter: bool = False) -> None:
    """``lora.*`` beyond ``enabled`` shape an adapter, which a run trains only under ``lora.enabled=true`` (or DPO's
    adapter reference): set otherwise, they are refused rather than a full fine-tune run in their place."""
    import dataclasses

    if not cfg.lora.enabled and not adapter:
        why = "lora.enabled is false: the run trains every weight; set lora.enabled=true for an adapter"
        refuse_unread(cfg, command, {f"lora.{f.name}": why for f in dataclasses.fields(cfg.lora)
                                     if f.name != "enabled"})


def register_training(sub, name: str, *, help: str, description: str, config: type, run: Callable, epilog: str = "",
                      check: Callable[[Any], None] | None = None) -> None:
    """A training command's sub-command: ``[CONFIG.yaml] key=value ... [--resume RUN_DIR]``, the config built by
    ``load_run_config`` (``check``: the command's own checks), ``run(cfg, resume=...)``'s summary printed as JSON.
    The help ends with every key of ``config`` (generated) and ``epilog``."""
    from preftune.config import config_help

    p = sub.add_parser(name, help=help, description=f"{description}\n{RESUME_RULE}",
                       epilog=config_help(config) + epilog, formatter_class=FORMATTER)
    add_config_args(p, resume=True)
    p.set_defaults(func=lambda args: print_result(run(load_run_config(args.args, args.resume, config, check=check),
                                                      resume=bool(args.resume))))


def register_experiment(sub, name: str, *, help: str, description: str, epilog: str, config: type,
                        quick: Callable[[Any], Any], run: Callable, quick_help: str, out_help: str) -> None:
    """An experiment's sub-command (demo, frontier): ``[CONFIG.yaml] key=value ... [--quick] [--out DIR]``;
    ``quick(config())`` gives the --quick defaults the YAML and overrides then apply to."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=FORMATTER)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", help=out_help)

    def main(args) -> int:
        path, overrides = split_config_args(args.args)
        run(load_config(path, overrides, base=quick(config()) if args.quick else config()), out=args.out)
        return 0

    p.set_defaults(func=main)


def print_result(result: dict) -> int:
    print(json.dumps(result, indent=2))
    return 0


def _fresh_policy(cfg, trained):
    """An unsharded model shaped like ``trained`` (LoRA-wrapped when it is) for its gathered weights."""
    from preftune.models.load import load_causal_lm
    from preftune.models.lora import apply_lora, is_peft_model

    model = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)
    return apply_lora(model, cfg.lora, seed=cfg.train.seed) if is_peft_model(trained) else model


def start_training_run(cfg, procs, command: str, resume: bool, load, tokenizer):
    """The start of a dpo, sft or reward run: its data read (``load(cfg, tokenizer, summary)``), ``train.epochs``
    turned into ``train.max_steps``, then its run directory (which saves the config), ``RUN/data.json`` and its
    experiment trackers. Returns (train items, eval items, run directory)."""
    from preftune.data.splits import resolve_epochs, write_data_summary
    from preftune.train.trackers import open_trackers

    summary: dict = {}
    train_items, eval_items = load(cfg, tokenizer, summary)
    resolve_epochs(cfg, len(train_items), procs.world)
    run_dir = procs.run_dir(cfg, command, resume)
    write_data_summary(run_dir, summary, procs)
    open_trackers(cfg, run_dir, procs)
    return train_items, eval_items, run_dir


def finish_policy_run(procs, cfg, policy, tokenizer, run_dir, kind: str) -> None:
    """The end of a policy-training run (DPO, SFT): process 0 saves RUN/policy and plots the metrics around one
    barrier."""
    from preftune.eval.plots import plot_training
    from preftune.models.save import save_policy
    from preftune.train.rundir import read_metrics
    from preftune.train.runtime import peak_memory_gb
    from preftune.train.trackers import close_trackers

    log.info("process %d of %d (%s): %s", procs.rank, procs.world, procs.sharding if procs.world > 1 else "one",
             ", ".join(f"{k} {v:.2f}" for k, v in peak_memory_gb(next(policy.parameters()).device).items()))
    if cfg.train.save_final:
        whole = procs.unsharded(policy, lambda: _fresh_policy(cfg, policy), "model.")
        if procs.is_main:
            save_policy(cfg, whole, tokenizer, run_dir)
    procs.barrier()
    if procs.is_main and cfg.run.plot:
        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", kind=kind)
    close_trackers(run_dir, run_dir / "training.png" if cfg.run.plot else None)


def reused_or_run(run_dir: Path, key: dict, run, *, resumable: bool = False):
    """A run's result (its points), reused from ``RUN/result.json`` when it was written under the same ``key``, so
    that an interrupted or re-tuned experiment (frontier, winrate) in the same ``--out`` repeats only what changed.
    A ``resumable`` run (``run(resume)``: its result is computed from its run directory after training) that was
    stopped under the same key (``RUN/pending.json``, a checkpoint) continues from its last checkpoint; otherwise
    the run starts from scratch in an emptied ``run_dir``."""
    from preftune.train.checkpoint import latest_checkpoint
    from preftune.train.rundir import atomic_write_text

    cache, pending = run_dir / "result.json", run_dir / "pending.json"
    key = json.loads(json.dumps(key))  # as it reads back
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            log.info("reusing %s (finished under the same settings)", run_dir)
            return saved["result"]
    resume = (resumable and pending.is_file() and json.loads(pending.read_text(encoding="utf-8")) == key
              and latest_checkpoint(run_dir) is not None)
    if resume:
        log.info("resuming %s from its last checkpoint (stopped under the same settings)", run_dir)
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pending, json.dumps(key))
    result = run(resume) if resumable else run()
    # evaluated: the checkpoints (weights + optimizer state, ~1 GB each on SmolLM2, several per run) would fill
    # a disk over a whole frontier; each run's final policy/ stays for inspection
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    atomic_write_text(cache, json.dumps({"key": key, "result": result}, indent=1))
    pending.unlink(missing_ok=True)
    return result
