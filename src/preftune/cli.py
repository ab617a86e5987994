"""``preftune {demo,sft,dpo,eval,sample,score,...}``: parse the config and overrides, call run_*. No logic here.

Config-driven commands take an optional YAML file and ``dotted.key=value`` overrides, e.g.
``preftune dpo model=tiny data.train=pairs.jsonl train.max_steps=10 run.dir=runs/x``.
Exit codes: 0 success, 2 bad input (config, data, model spec), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from preftune.config import config_help

_CONFIG_HELP = config_help()


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    path = None
    overrides = []
    for a in args:
        if "=" not in a and a.endswith((".yaml", ".yml")) and path is None:
            path = a
        else:
            overrides.append(a)
    return path, overrides


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="an optional YAML config, then dotted overrides (see below)")


def _load(args) -> "object":
    from preftune.config import load_config

    path, overrides = _split_config_args(args.args)
    resume = getattr(args, "resume", None)
    if resume:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {resume}: no config.yaml there (not a run directory)")
        # the run continues where it was found (a copied run directory must not write into its original)
        return load_config(saved, list(overrides) + [f"run.dir={resume}"])
    return load_config(path, overrides)


def cmd_train(args) -> int:
    cfg = _load(args)
    if args.command == "dpo":
        from preftune.train.dpo import run_dpo as run
    else:
        from preftune.train.sft import run_sft as run
    result = run(cfg, resume=bool(args.resume))
    print(json.dumps(result, indent=2))
    return 0


def cmd_eval(args) -> int:
    from preftune.train.evaluate import run_eval

    result = run_eval(_load(args), out=args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_sample(args) -> int:
    from preftune.eval.generate_cli import run_sample

    run_sample(model=args.model, prompts=args.prompts, out=args.out, num_samples=args.num_samples,
               temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
               batch_size=args.batch_size, seed=args.seed)
    return 0


def cmd_score(args) -> int:
    from preftune.eval.scorers import score_file

    mean = score_file(args.samples, args.out or args.samples, args.scorer)
    print(f"mean {args.scorer} score: {mean:.4f}")
    return 0


def cmd_demo(args) -> int:
    from preftune.experiments.sentiment import run_demo

    path, overrides = _split_config_args(args.args)
    run_demo(config=path, overrides=overrides, quick=args.quick, out=args.out)
    return 0


# Commands defined next to their code: each module exposes ``register(subparsers)`` that adds a subparser whose
# ``func(args) -> int`` does the work. Modules must import cheaply (heavy imports inside ``func``).
_COMMAND_MODULES = (
    "preftune.train.reward_cli",
    "preftune.train.ppo_cli",
    "preftune.experiments.frontier_cli",
    "preftune.benchmark.cli",
)


def _register_modules(sub) -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(sub)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="preftune", description="Direct preference optimisation, offline-first.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (("dpo", "train a policy on preference pairs with DPO"),
                       ("sft", "supervised fine-tuning on completions (Preferred-FT on pairs' chosen)")):
        p = sub.add_parser(name, help=text, description=text, epilog=_CONFIG_HELP, formatter_class=fmt)
        _add_config_args(p)
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out preference metrics of a model against its reference",
                       description="Evaluate `model` against `ref_model` on data.eval (or data.train) pairs: "
                                   "loss, implicit rewards, preference accuracy, margins.",
                       epilog=_CONFIG_HELP, formatter_class=fmt)
    _add_config_args(p)
    p.add_argument("--out", help="write the metrics as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="batched sampling (KV cache) from a model",
                       description="Sample completions for prompts. Input JSONL rows need `prompt` (a string or "
                                   "a list of messages); output rows add `completion` (and `sample` index).")
    p.add_argument("model", help="model spec: alias, HF dir (e.g. RUN/policy), .gguf or hub id")
    p.add_argument("--prompts", required=True, help="JSONL file with a `prompt` field per line")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--batch-size", type=int, default=32, help="sequences generated together (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("score", help="score samples with a sentiment scorer",
                       description="Add `score_<scorer>` to each JSONL row (computed on prompt + completion, the "
                                   "full text, as the DPO paper's sentiment classifier scores it) and print the mean.")
    p.add_argument("samples", help="JSONL with `prompt` and `completion`")
    p.add_argument("--scorer", required=True, help="sentiment (the demo's oracle, P(positive)) | vader (compound) | "
                                                   "rm:PATH (a reward model trained with `preftune reward`)")
    p.add_argument("--out", help="output file (default: rewrite SAMPLES in place, atomically)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("demo", help="the main job: the DPO paper's sentiment experiment in miniature",
                       description="Sample movie-review continuations from the embedded model, score them with a "
                                   "sentiment oracle, build preference pairs, train with DPO, and compare reference "
                                   "vs policy on held-out prompts: oracle reward, VADER and KL(policy||reference).",
                       epilog="The optional config (e.g. configs/sentiment-imdb.yaml) and overrides use the "
                              "`demo.*` keys of preftune/experiments/sentiment.py (DemoConfig).",
                       formatter_class=fmt)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value")
    p.add_argument("--quick", action="store_true", help="a ~3 minute version (fewer prompts and steps)")
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    p.set_defaults(func=cmd_demo)
    _register_modules(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from preftune.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: metrics so far are in the run directory; continue with --resume RUN_DIR",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
