"""``preftune ppo``: the RLHF baseline, PPO against a scorer, with its own explicit loop.

Each iteration: take ``ppo.batch_size`` prompts (seeded order) -> sample one completion each from the policy
-> score the full text (prompt + completion) with ``ppo.scorer`` -> policy, reference and value estimates on
the exact sampled tokens -> KL-shaped per-token rewards -> GAE -> ``ppo.ppo_epochs`` epochs of minibatch
updates of the clipped policy loss + ``vf_coef`` x clipped value loss (the maths: ``preftune.rl.ppo_math``).

Value head: ``nn.Linear(hidden, 1)`` in fp32 on the policy's last decoder hidden states (after the final
norm), sharing the body with the policy as TRL's ``AutoModelForCausalLMWithValueHead`` and Ziegler et al.
do: value-loss gradients reach the transformer. It is zero-initialised, so the first value estimates are 0.
The value of token t is read at the state that predicted it (the same position as its log-prob).

Scorers: ``sentiment`` (the ground-truth oracle: the DPO paper's "PPO-GT"), ``vader`` or ``rm:PATH`` (a learned
reward model), or any object with ``__call__(texts) -> scores`` passed to :func:`run_ppo`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from preftune import faults
from preftune.config import Config, ConfigError, DataConfig, DPOConfig, TrainConfig, load_config, save_config
from preftune.errors import InputError
from preftune.rl.ppo_math import AdaptiveKLController, FixedKLController, masked_sum
from preftune.rl.ppo_steps import PolicyWithValue, compute_advantages, ppo_update, rollout
from preftune.train.distributed import single_process_only

log = logging.getLogger(__name__)
EvalHook = Callable[[nn.Module, int], "dict[str, float] | None"]


@dataclass
class PPOSettings:
    prompts: str = "rotten_tomatoes"  # rotten_tomatoes (held-out RT snippet openings) | a JSONL file with `prompt`
    num_prompts: int = 1024  # size of the prompt pool (a JSONL file: its first N)
    scorer: str = "sentiment"  # sentiment (ground-truth oracle, "PPO-GT") | vader | rm:PATH (a reward model)
    iterations: int = 100  # rollout -> update rounds
    batch_size: int = 16  # prompts per iteration, one completion each
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch_size: int = 8  # samples per optimizer step (must divide batch_size)
    lr: float = 1e-5
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.1  # per-token KL penalty coefficient (the initial one when adaptive)
    adaptive_kl: bool = False  # Ziegler et al.'s controller towards target_kl
    target_kl: float = 6.0  # nats per sequence
    horizon: int = 10000
    whiten_rewards: bool = False  # rescale per-token rewards (mean kept) before GAE
    max_new_tokens: int = 24
    temperature: float = 1.0  # log-probs are those of the policy at temperature 1: other values make PPO off-policy
    generation_batch_size: int = 64  # sequences sampled (and scored by no-grad forwards) together
    eval_every: int = 0  # run_ppo's eval_hook every N iterations and at the end (0: never)
    save_every: int = 0  # checkpoint every N iterations (0: only at the end)


def _ppo_train() -> TrainConfig:
    return TrainConfig(optimizer="adamw", max_grad_norm=1.0)


@dataclass
class PPORunConfig(Config):
    ppo: PPOSettings = field(default_factory=PPOSettings)
    train: TrainConfig = field(default_factory=_ppo_train)


# train.* keys PPO reads; every other train/data/dpo key must stay at its default (never silently ignored)
USED_TRAIN_KEYS = ("seed", "precision", "num_threads", "progress", "optimizer", "weight_decay", "max_grad_norm",
                   "keep_checkpoints", "device", "tf32")
_INSTEAD = {"lr": "ppo.lr", "max_steps": "ppo.iterations", "batch_size": "ppo.batch_size",
            "eval_every": "ppo.eval_every", "save_every": "ppo.save_every"}


def check_config(cfg: PPORunConfig) -> None:
    """PPO-specific checks on top of ``load_config``'s, before anything loads."""
    s = cfg.ppo
    defaults = PPORunConfig()
    for section, default, used in (("train", defaults.train, USED_TRAIN_KEYS), ("data", DataConfig(), ()),
                                   ("dpo", DPOConfig(), ())):
        for f in dataclasses.fields(default):
            if f.name not in used and getattr(getattr(cfg, section), f.name) != getattr(default, f.name):
                hint = f" (set {_INSTEAD[f.name]})" if section == "train" and f.name in _INSTEAD else ""
                raise ConfigError(f"config key '{section}.{f.name}' is not used by ppo{hint}")
    if cfg.reference.mode != "model" or cfg.lora.enabled:
        raise ConfigError("ppo keeps the reference as a frozen copy: reference.mode must be 'model' and "
                          "lora.enabled false")
    positive = {"iterations": s.iterations, "batch_size": s.batch_size, "ppo_epochs": s.ppo_epochs,
                "minibatch_size": s.minibatch_size, "lr": s.lr, "clip_range": s.clip_range,
                "clip_range_value": s.clip_range_value, "target_kl": s.target_kl, "horizon": s.horizon,
                "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "num_prompts": s.num_prompts,
                "generation_batch_size": s.generation_batch_size}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key 'ppo.{name}' must be > 0, got {value}")
    if s.batch_size % s.minibatch_size:
        raise ConfigError(f"config key 'ppo.minibatch_size' ({s.minibatch_size}) must divide ppo.batch_size "
                          f"({s.batch_size})")
    for name, value in (("gamma", s.gamma), ("lam", s.lam)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key 'ppo.{name}' must be in [0, 1], got {value}")
    for name, value in (("kl_coef", s.kl_coef), ("vf_coef", s.vf_coef), ("eval_every", s.eval_every),
                        ("save_every", s.save_every)):
        if value < 0:
            raise ConfigError(f"config key 'ppo.{name}' must be >= 0, got {value}")


def load_ppo_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PPORunConfig:
    cfg = load_config(path, overrides, base=PPORunConfig())
    check_config(cfg)
    return cfg


def load_prompts(s: PPOSettings, seed: int) -> list[str]:
    if s.prompts == "rotten_tomatoes":
        from preftune.experiments.prompts import rotten_tomatoes_prompts

        return rotten_tomatoes_prompts(s.num_prompts, seed=seed)
    if not Path(s.prompts).is_file():
        raise InputError(f"ppo.prompts: {s.prompts!r} is neither 'rotten_tomatoes' nor an existing JSONL file")
    from preftune.eval.generate_cli import read_prompts

    prompts = read_prompts(s.prompts)[: s.num_prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{s.prompts}: ppo needs plain-string prompts (the scorer reads prompt + completion)")
    return prompts


def _resolve_scorer(cfg: PPORunConfig, scorer):
    if scorer is None:
        from preftune.eval.scorers import get_scorer

        try:
            return get_scorer(cfg.ppo.scorer)
        except ValueError as exc:
            raise ConfigError(f"config key 'ppo.scorer': {exc}") from None
    cfg.ppo.scorer = f"custom:{getattr(scorer, 'name', type(scorer).__name__)}"  # recorded, not reloadable
    return scorer


def run_ppo(cfg: PPORunConfig, *, resume: bool = False, eval_hook: EvalHook | None = None, scorer=None,
            prompts: list[str] | None = None) -> dict[str, Any]:
    """Train a policy with PPO; returns {run_dir, iterations, train (last metrics), eval (last eval_hook result)}.

    ``eval_hook(policy, iteration)`` runs every ``ppo.eval_every`` iterations and after the last (eval mode, no
    gradients); a returned dict is logged as ``eval/<key>``. ``scorer`` (any ``texts -> scores`` callable)
    replaces ``ppo.scorer``; ``prompts`` replaces ``ppo.prompts`` (written to RUN/prompts.jsonl)."""
    single_process_only("ppo")
    from preftune.data.records import write_jsonl
    from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
    from preftune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from preftune.train.common import pick_device, resolve_precision, save_policy, setup_threads
    from preftune.train.loop import DataOrder
    from preftune.train.optim import build_optimizer
    from preftune.train.rundir import MetricsWriter, make_run_dir, read_metrics

    check_config(cfg)
    setup_threads(cfg)
    s = cfg.ppo
    scorer = _resolve_scorer(cfg, scorer)
    run_dir = Path(cfg.run.dir) if resume else make_run_dir(cfg, "ppo")
    if prompts is not None and not resume:
        write_jsonl(run_dir / "prompts.jsonl", [{"prompt": p} for p in prompts])
        s.prompts, s.num_prompts = str(run_dir / "prompts.jsonl"), len(prompts)
        save_config(cfg, run_dir / "config.yaml")
    prompts = load_prompts(s, cfg.train.seed)
    device = pick_device(cfg)
    precision = resolve_precision(cfg, device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = PolicyWithValue(load_causal_lm(cfg.model, seed=cfg.train.seed,
                                           trust_remote_code=cfg.trust_remote_code)).to(device)
    reference = load_reference(cfg.ref_model or cfg.model, seed=cfg.train.seed,
                               trust_remote_code=cfg.trust_remote_code).to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                dataclasses.replace(cfg.train, lr=s.lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    kl_ctl = AdaptiveKLController(s.kl_coef, s.target_kl, s.horizon) if s.adaptive_kl else FixedKLController(s.kl_coef)
    order, metrics, iteration = DataOrder(len(prompts), cfg.train.seed), MetricsWriter(run_dir / "metrics.jsonl"), 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        iteration, kl_ctl.value = state["step"], state["kl_coef"]
        order.load(state["data"])
    if resume:
        metrics.truncate_after(iteration)
    model.train()
    log.info("PPO on %s: %d prompts, scorer=%s, device=%s precision=%s, %d iterations x %d prompts",
             cfg.model, len(prompts), s.scorer, device, precision, s.iterations, s.batch_size)
    save = functools.partial(save_checkpoint, run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                             keep=cfg.train.keep_checkpoints)
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    try:
        while iteration < s.iterations:
            iteration += 1
            last = run_iteration(model, reference, tokenizer, scorer, [prompts[i] for i in order.take(s.batch_size)],
                                 cfg, kl_ctl, optimizer, scheduler, iteration, device, precision)
            metrics.write({"step": iteration, **last})
            log.log(logging.INFO if cfg.train.progress else logging.DEBUG, "iteration %d/%d  %s", iteration,
                    s.iterations, "  ".join(f"{k}={last[k]:.4g}" for k in ("reward", "kl", "kl_coef", "entropy",
                                                                            "policy_loss", "value_loss", "tokens_per_s")))
            faults.set_step(iteration)
            if eval_hook is not None and s.eval_every and (iteration % s.eval_every == 0 or iteration == s.iterations):
                last_eval = _run_eval_hook(eval_hook, model.policy, iteration, metrics)
            if s.save_every and iteration % s.save_every == 0 and iteration != s.iterations:
                save(step=iteration, trainer_state={"data": order.state(), "kl_coef": kl_ctl.value})
            faults.maybe_fault("after_step")
        save(step=iteration, trainer_state={"data": order.state(), "kl_coef": kl_ctl.value})
    finally:
        metrics.close()
    save_policy(cfg, model.policy, tokenizer, run_dir)
    if cfg.run.plot:
        from preftune.eval.plots import plot_training

        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", kind="ppo")
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
              str(run_dir / "value_head.safetensors"))
    return {"run_dir": str(run_dir), "iterations": iteration, "train": last, "eval": last_eval}


def run_iteration(model, reference, tokenizer, scorer, prompts, cfg: PPORunConfig, kl_ctl, optimizer, scheduler,
                  iteration: int, device: torch.device, precision: str) -> dict[str, float]:
    """One rollout -> advantages -> update round; returns its metrics (the one sync point of the iteration)."""
    s, seed = cfg.ppo, cfg.train.seed * 1_000_003 + 2 * iteration  # per-iteration seeds: resume is exact
    start = time.perf_counter()
    r = rollout(model, reference, tokenizer, scorer, prompts, s, seed, device, precision)
    kl_coef = kl_ctl.value
    compute_advantages(r, kl_coef, s)
    mask = r.batch["mask"]
    seq_kl = masked_sum(r.logprobs - r.ref_logprobs, mask, dim=1)  # (B,) sum over tokens of log pi - log pi_ref
    rollout_s = time.perf_counter() - start
    lr = scheduler.get_last_lr()[0]
    generator = torch.Generator().manual_seed(seed + 1)
    update = ppo_update(model, optimizer, scheduler, r, s, cfg.train.max_grad_norm, generator, device, precision)
    elapsed = time.perf_counter() - start
    kl = seq_kl.mean().item()
    kl_ctl.update(kl, n_steps=mask.shape[0])
    out = {"reward": r.scores.mean(), "reward_std": r.scores.std() if r.scores.numel() > 1 else r.scores.new_zeros(()),
           "non_score_reward": -kl_coef * seq_kl.mean(), "entropy": r.entropy, "completion_tokens": mask.sum(1).mean(),
           **update}
    metrics = {name: float(v) for name, v in out.items()}
    metrics.update(kl=kl, kl_coef=kl_coef, lr=lr, tokens_per_s=float(mask.sum()) / elapsed,
                   **{"time/rollout_s": rollout_s, "time/update_s": elapsed - rollout_s})
    return metrics


def _run_eval_hook(hook: EvalHook, policy: nn.Module, iteration: int, metrics) -> dict[str, float]:
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        result = hook(policy, iteration) or {}
    policy.train(was_training)
    logged = {f"eval/{k}": float(v) for k, v in result.items()}
    if logged:
        metrics.write({"step": iteration, **logged})
    return logged
