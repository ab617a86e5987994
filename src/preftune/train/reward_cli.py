"""``preftune reward [CONFIG.yaml] [key=value ...] [--resume RUN_DIR]``: registered by ``preftune.cli``.

Imports cheaply: the training code (torch, transformers) loads inside the command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DESCRIPTION = """\
Train a Bradley-Terry reward model on preference pairs (the RLHF baseline's first stage): the policy model's
decoder body + a scalar head read at the last token of each sequence, trained with -log σ(r(x, y_w) - r(x, y_l)).
Takes the same data as `preftune dpo`. Writes RUN/reward_model/ (HF format + reward_head.safetensors +
reward_config.json); score samples with `preftune score FILE --scorer rm:RUN/reward_model`."""

_REWARD_KEYS = """\
  reward.normalize (true)     store the mean/std of training rewards; scorers report (r - mean) / std
  reward.head_init (normal)   normal: N(0, 1/(H+1)) seeded by train.seed | zeros: all scores start at 0
  not applicable here (refused when set): ref_model, dpo.*, reference.*, lora.*
  (run.plot has no effect here: reward runs write no plot)
metrics: loss, accuracy (r_w > r_l), rewards/chosen, rewards/rejected, rewards/margins; eval/... on held-out
pairs (data.eval or data.eval_fraction)
"""


def _epilog() -> str:
    from preftune.cli import _CONFIG_HELP

    skip = ("  ref_model", "  dpo.", "  reference.", "  lora.")
    return "\n".join(line for line in _CONFIG_HELP.splitlines() if not line.startswith(skip)) + "\n" + _REWARD_KEYS


def register(sub) -> None:
    from preftune.cli import _add_config_args

    text = "train a Bradley-Terry reward model on preference pairs"
    p = sub.add_parser("reward", help=text, description=_DESCRIPTION, epilog=_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.set_defaults(func=cmd_reward)


def load_reward_config(args: list[str], resume: str | None):
    """Defaults <- YAML <- overrides; with --resume, RUN_DIR/config.yaml <- overrides, and the run continues
    in RUN_DIR (wherever the saved config's run.dir pointed)."""
    from preftune.cli import _split_config_args
    from preftune.config import ConfigError, load_config
    from preftune.train.reward import RewardRunConfig

    path, overrides = _split_config_args(args)
    if not resume:
        return load_config(path, overrides, base=RewardRunConfig())
    if path is not None:
        raise ConfigError(f"--resume takes its config from {resume}/config.yaml; pass overrides only, not {path}")
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.yaml there (not a run directory)")
    return load_config(saved, [*overrides, f"run.dir={resume}"], base=RewardRunConfig())


def cmd_reward(args) -> int:
    from preftune.train.reward import run_reward

    cfg = load_reward_config(args.args, args.resume)
    result = run_reward(cfg, resume=bool(args.resume))
    print(json.dumps(result, indent=2))
    return 0
