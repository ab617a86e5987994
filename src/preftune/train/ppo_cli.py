"""``preftune ppo [CONFIG.yaml] [key=value ...] [--resume RUN_DIR]``: registered by ``preftune.cli``.

Imports cheaply: the training code (torch, transformers) loads inside the command. The key list below mirrors
``PPOSettings`` in ``preftune/train/ppo.py`` (where the defaults live); a test keeps the two in step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DESCRIPTION = """\
Train a policy with PPO against a scorer, the standard RLHF recipe and the DPO paper's baseline (Ziegler et
al. 2019): per iteration, sample one completion for each of ppo.batch_size prompts, score prompt + completion,
shape per-token rewards with a KL penalty to the frozen reference, estimate advantages with GAE and a value
head (a linear layer on the policy's last hidden states, sharing its body), then run ppo.ppo_epochs epochs of
clipped policy + value updates. ppo.scorer=sentiment is the ground-truth oracle ("PPO-GT");
ppo.scorer=rm:RUN/reward_model uses a reward model trained by `preftune reward`."""

_PPO_KEYS = """\
config keys (defaults in parentheses; see preftune/train/ppo.py):
  model (smollm2-135m)          the policy's starting point: alias smollm2-135m | tiny, HF dir, .gguf, hub id
  ref_model (= model)           the frozen reference (a separate copy, eval mode)
  ppo.prompts (rotten_tomatoes) held-out Rotten Tomatoes openings, or a JSONL file with a string `prompt`
  ppo.num_prompts (1024)        prompt pool size (a JSONL file: its first N)
  ppo.scorer (sentiment)        sentiment (ground-truth oracle) | vader | rm:PATH (a trained reward model)
  ppo.iterations (100)          rollout -> update rounds
  ppo.batch_size (16)           prompts per iteration (one completion each)
  ppo.ppo_epochs (4)            passes over each rollout
  ppo.minibatch_size (8)        samples per optimizer step; must divide ppo.batch_size
  ppo.lr (1e-05)                learning rate (policy and value head)
  ppo.clip_range (0.2)          policy ratio clip
  ppo.clip_range_value (0.2)    value clip around the rollout's values
  ppo.vf_coef (0.1)             value loss weight
  ppo.gamma (1.0) ppo.lam (0.95)  GAE discount and lambda
  ppo.kl_coef (0.1)             per-token KL penalty coefficient (initial value when adaptive)
  ppo.adaptive_kl (false)       Ziegler et al.'s controller: moves kl_coef towards ppo.target_kl
  ppo.target_kl (6.0)           nats per sequence
  ppo.horizon (10000)           the controller's horizon, in samples
  ppo.whiten_rewards (false)    rescale per-token rewards (mean kept) before GAE
  ppo.max_new_tokens (24)       completion length limit
  ppo.temperature (1.0)         sampling temperature (log-probs are at temperature 1: keep 1 for on-policy PPO)
  ppo.generation_batch_size (64)  sequences sampled together
  ppo.eval_every (0)            the in-process eval hook's cadence (run_ppo(cfg, eval_hook=...))
  ppo.save_every (0)            checkpoint every N iterations (0: only at the end)
  train.seed (0) train.precision (auto|fp32|bf16) train.num_threads train.optimizer (adamw)
  train.weight_decay (0) train.max_grad_norm (1.0) train.keep_checkpoints (2) train.device train.tf32
  train.progress (true)         one log line per iteration
  run.dir (runs/ppo-<time>)
  not used (refused when changed): other train.* keys (use ppo.lr, ppo.iterations, ...), data.*, dpo.*,
  reference.mode other than model, lora.enabled
metrics.jsonl, one row per iteration: reward (mean score), reward_std, kl (mean over samples of the sum over
tokens of log pi - log pi_ref, at sampling time), kl_coef, non_score_reward, entropy, completion_tokens,
policy_loss, value_loss, clip_fraction, value_clip_fraction, approx_kl (mean 1/2 (log ratio)^2), grad_norm,
lr, tokens_per_s (completion tokens per second of iteration), time/rollout_s, time/update_s.
The run directory also holds config.yaml, env.json, checkpoints/, policy/ (HF format) and value_head.safetensors.
"""


def register(sub) -> None:
    from preftune.cli import _add_config_args

    text = "train a policy with PPO against a scorer (the RLHF baseline)"
    p = sub.add_parser("ppo", help=text, description=_DESCRIPTION, epilog=_PPO_KEYS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.set_defaults(func=cmd_ppo)


def load_ppo_args(args: list[str], resume: str | None):
    """Defaults <- YAML <- overrides; with --resume, RUN_DIR/config.yaml <- overrides, continuing in RUN_DIR."""
    from preftune.cli import _split_config_args
    from preftune.config import ConfigError
    from preftune.train.ppo import load_ppo_config

    path, overrides = _split_config_args(args)
    if not resume:
        return load_ppo_config(path, overrides)
    if path is not None:
        raise ConfigError(f"--resume takes its config from {resume}/config.yaml; pass overrides only, not {path}")
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.yaml there (not a run directory)")
    return load_ppo_config(saved, [*overrides, f"run.dir={resume}"])


def cmd_ppo(args) -> int:
    from preftune.train.ppo import run_ppo

    cfg = load_ppo_args(args.args, args.resume)
    result = run_ppo(cfg, resume=bool(args.resume))
    print(json.dumps(result, indent=2))
    return 0
