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
reward model), or any object with ``__call__(texts) -> scores`` passed to :func:`run`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from preftune.config import RunConfig, TrainConfig, config_help, load_config, save_config
from preftune.errors import ConfigError, InputError
from preftune.recipes.common import register_training
from preftune.rl.settings import PPOSettings, check_ppo_settings

log = logging.getLogger(__name__)
EvalHook = Callable[[Any, int], "dict[str, float] | None"]


@dataclass
class PPOTrainConfig:
    """The ``train.*`` keys PPO reads (its steps, batch and learning rate are ``ppo.*``: ``INSTEAD``)."""

    INSTEAD: ClassVar[dict[str, str]] = {"lr": "ppo.lr", "max_steps": "ppo.iterations", "batch_size": "ppo.batch_size",
                                         "eval_every": "ppo.eval_every", "save_every": "ppo.save_every"}

    seed: int = 0  # fixes initialisation (tiny model), prompt order and sampling
    precision: str = "auto"  # auto | fp32 | bf16 (autocast for the transformer body; log-probs are always fp32)
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    progress: bool = True  # one log line per iteration
    optimizer: str = "adamw"  # rmsprop | adamw | sgd (PPO's default: adamw)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    # a minibatch step whose loss or gradient is not finite is skipped (counted as skipped_steps); more than this
    # many in a row stop the run (exit 3). An iteration holds ppo.ppo_epochs x batch_size / minibatch_size steps.
    max_skipped_steps: int = 16
    keep_checkpoints: int = 2
    device: str = "auto"  # auto (a CUDA GPU when there is one, else the CPU) | cpu | cuda | cuda:N | mps
    tf32: bool = False  # CUDA: TF32 tensor cores for fp32 matmuls


@dataclass
class PPORunConfig:
    """``preftune ppo``'s config: the sections it reads."""

    COMMAND: ClassVar[str] = "ppo"

    model: str = "smollm2-135m"  # the policy's starting point: alias smollm2-135m | tiny, HF dir, .gguf, hub id
    ref_model: str | None = None  # the frozen reference (a separate copy, eval mode); defaults to `model`
    trust_remote_code: bool = False
    ppo: PPOSettings = field(default_factory=PPOSettings)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


def check_config(cfg: PPORunConfig) -> None:
    """PPO-specific checks on top of ``load_config``'s, before anything loads."""
    check_ppo_settings(cfg.ppo)
    if cfg.train.max_skipped_steps < 0:
        raise ConfigError(f"config key 'train.max_skipped_steps' must be >= 0, got {cfg.train.max_skipped_steps}")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError(f"config key 'train.keep_checkpoints' must be >= 1, got {cfg.train.keep_checkpoints}")


def load_ppo_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PPORunConfig:
    cfg = load_config(path, overrides, base=PPORunConfig())
    check_config(cfg)
    return cfg


_DESCRIPTION = """\
Train a policy with PPO against a scorer, the standard RLHF recipe and the DPO paper's baseline (Ziegler et
al. 2019): per iteration, sample one completion for each of ppo.batch_size prompts, score prompt + completion,
shape per-token rewards with a KL penalty to the frozen reference, estimate advantages with GAE and a value
head (a linear layer on the policy's last hidden states, sharing its body), then run ppo.ppo_epochs epochs of
clipped policy + value updates. ppo.scorer=sentiment is the ground-truth oracle ("PPO-GT");
ppo.scorer=rm:RUN/reward_model uses a reward model trained by `preftune reward`."""

_NOTES = """\
  not used (refused when set): other train.* keys (use ppo.lr, ppo.iterations, ...), data.*, dpo.*, reference.*,
  lora.* (the reference is a frozen copy of ref_model, or of model)
metrics.jsonl, one row per iteration: reward (mean score), reward_std, kl (mean over samples of the sum over
tokens of log pi - log pi_ref, at sampling time), kl_coef, non_score_reward, entropy, completion_tokens,
policy_loss, value_loss, clip_fraction, value_clip_fraction, approx_kl (mean 1/2 (log ratio)^2), grad_norm,
lr, tokens_per_s (completion tokens per second of iteration), time/rollout_s, time/update_s, skipped_steps
(minibatch steps skipped so far for a non-finite loss or gradient; the update means are over the steps taken).
The run directory also holds config.yaml, env.json, checkpoints/, policy/ (HF format) and value_head.safetensors.
"""
_PPO_KEYS = config_help(PPORunConfig) + _NOTES



def register(sub) -> None:
    register_training(sub, "ppo", help="train a policy with PPO against a scorer (the RLHF baseline)",
                      description=_DESCRIPTION, config=PPORunConfig, run=run, epilog=_NOTES, check=check_config)


def load_prompts(s: PPOSettings, seed: int) -> list[str]:
    if s.prompts == "rotten_tomatoes":
        from preftune.eval.prompts import rotten_tomatoes_prompts

        return rotten_tomatoes_prompts(s.num_prompts, seed=seed)
    if not Path(s.prompts).is_file():
        raise InputError(f"ppo.prompts: {s.prompts!r} is neither 'rotten_tomatoes' nor an existing JSONL file")
    from preftune.data.records import read_prompts

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


def run(cfg: PPORunConfig, *, resume: bool = False, eval_hook: EvalHook | None = None, scorer=None,
            prompts: list[str] | None = None) -> dict[str, Any]:
    """Train a policy with PPO; returns {run_dir, iterations, train (last metrics), eval (last eval_hook result)}.

    ``eval_hook(policy, iteration)`` runs every ``ppo.eval_every`` iterations and after the last (eval mode, no
    gradients); a returned dict is logged as ``eval/<key>``. ``scorer`` (any ``texts -> scores`` callable)
    replaces ``ppo.scorer``; ``prompts`` replaces ``ppo.prompts`` (written to RUN/prompts.jsonl)."""
    from preftune import faults
    from preftune.rl.ppo_steps import run_eval_hook, run_iteration
    from preftune.train.loop import DataOrder
    from preftune.train.rundir import MetricsWriter
    from preftune.train.runtime import pick_device, resolve_precision, setup_threads
    from preftune.train.signals import StopOnSignal, stop_run
    from preftune.train.trackers import open_trackers

    check_config(cfg)
    setup_threads(cfg)
    s = cfg.ppo
    procs = _processes(cfg)
    scorer = _resolve_scorer(cfg, scorer)
    if cfg.ref_model not in (None, cfg.model):  # before the run directory: nothing written for a refused run
        from preftune.models.load import check_reference_tokenizer, load_tokenizer

        check_reference_tokenizer(load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code), cfg.ref_model,
                                  cfg.model, trust_remote_code=cfg.trust_remote_code)
    run_dir = procs.run_dir(cfg, "ppo", resume)
    prompts = _prompts(cfg, procs, run_dir, prompts, resume)
    open_trackers(cfg, run_dir, procs)
    device = pick_device(cfg, procs)
    precision = resolve_precision(cfg, device)
    tokenizer, model, reference, optimizer, scheduler, kl_ctl = _build(cfg, device)
    stepped = procs.wrap(model) if procs.world > 1 else model
    order = DataOrder(len(prompts), cfg.train.seed)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=procs.is_main)
    iteration, skips = _restore(run_dir, resume, model, optimizer, scheduler, kl_ctl, order, metrics)
    model.train()
    log.info("PPO on %s: %d prompts, scorer=%s, device=%s precision=%s, %d iterations x %d prompts%s",
             cfg.model, len(prompts), s.scorer, device, precision, s.iterations, s.batch_size,
             f" over {procs.world} processes" if procs.world > 1 else "")
    save = functools.partial(_save_checkpoint, procs, run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                             keep=cfg.train.keep_checkpoints)
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    stop = StopOnSignal()
    try:
        with stop:
            while iteration < s.iterations:
                iteration += 1
                batch = [prompts[i] for i in order.take(s.batch_size)]
                faults.set_step(iteration)
                last = run_iteration(stepped, reference, tokenizer, scorer, batch, cfg, kl_ctl, optimizer, scheduler,
                                     iteration, device, precision, procs, skips)
                metrics.write({"step": iteration, **last})
                _log_iteration(cfg, iteration, last)
                if eval_hook is not None and s.eval_every and (iteration % s.eval_every == 0
                                                               or iteration == s.iterations):
                    last_eval = run_eval_hook(eval_hook, model.policy, iteration, metrics)
                state = functools.partial(save, step=iteration, trainer_state={"data": order.state(),
                                                                                "kl_coef": kl_ctl.value,
                                                                                "skipped_steps": skips.total})
                saved = bool(s.save_every) and iteration % s.save_every == 0 and iteration != s.iterations
                if saved:
                    state()
                faults.maybe_fault("after_step")
                asked = stop.requested(procs)
                if asked:
                    stop_run(asked, iteration, run_dir, None if saved else state)
            save(step=iteration, trainer_state={"data": order.state(), "kl_coef": kl_ctl.value,
                                                "skipped_steps": skips.total})
    finally:
        metrics.close()
    if procs.is_main:
        _save_outputs(cfg, model, tokenizer, run_dir)
    procs.barrier()
    return {"run_dir": str(run_dir), "iterations": iteration, "train": last, "eval": last_eval}


def _restore(run_dir: Path, resume: bool, model, optimizer, scheduler, kl_ctl, order, metrics):
    """(the iteration to continue from, the skipped steps so far): from the latest checkpoint on ``--resume``
    (weights, optimizer, KL controller, prompt order), else a fresh start; rows logged after it are dropped."""
    from preftune.train.checkpoint import latest_checkpoint, load_checkpoint
    from preftune.train.loop import Skips

    checkpoint = latest_checkpoint(run_dir) if resume else None
    iteration, skips = 0, Skips()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        iteration, kl_ctl.value = state["step"], state["kl_coef"]
        order.load(state["data"])
        skips = Skips(state.get("skipped_steps", 0))
    if resume:
        metrics.truncate_after(iteration)
    return iteration, skips


def _log_iteration(cfg: PPORunConfig, iteration: int, last: dict[str, float]) -> None:
    shown = ("reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "tokens_per_s")
    log.log(logging.INFO if cfg.train.progress else logging.DEBUG, "iteration %d/%d  %s", iteration,
            cfg.ppo.iterations, "  ".join(f"{k}={last.get(k, float('nan')):.4g}" for k in shown))


def _processes(cfg: PPORunConfig):
    """This process's view of a data-parallel PPO run (an FSDP launch, or too small a minibatch, refused)."""
    from preftune.train.distributed import Processes

    procs = Processes.from_env(cfg.train.device)
    if procs.sharding != "none":
        raise ConfigError("preftune ppo runs data parallel (every process holds the whole policy); an FSDP launch "
                          "config does not apply to it: launch it without one")
    if cfg.ppo.minibatch_size < procs.world:
        raise ConfigError(f"config key 'ppo.minibatch_size' ({cfg.ppo.minibatch_size}) is smaller than the number "
                          f"of processes ({procs.world}): each process takes a share of every minibatch")
    return procs


def _prompts(cfg: PPORunConfig, procs, run_dir: Path, prompts: list[str] | None, resume: bool) -> list[str]:
    """The training prompts: ``prompts`` given in-process are written to RUN/prompts.jsonl (by process 0) and
    become ``ppo.prompts``; then read as configured. Resumed in-process (the frontier's arms, with a fresh
    config), the same prompts must be given again, and the run reads its own file."""
    from preftune.data.records import read_jsonl, write_jsonl
    from preftune.errors import ConfigError

    s = cfg.ppo
    if prompts is not None:
        saved = run_dir / "prompts.jsonl"
        if resume and [r["prompt"] for r in read_jsonl(saved)] != list(prompts):
            raise ConfigError(f"--resume {run_dir}: the prompts given differ from the run's own ({saved})")
        s.prompts, s.num_prompts = str(saved), len(prompts)
        if procs.is_main:
            if not resume:
                write_jsonl(saved, [{"prompt": p} for p in prompts])
            save_config(cfg, run_dir / "config.yaml", command="ppo")
        procs.barrier()
    return load_prompts(s, cfg.train.seed)


def _save_checkpoint(procs, run_dir: Path, **kwargs) -> None:
    """Process 0 writes the checkpoint (every process holds the same weights and state); the others wait."""
    from preftune.train.checkpoint import save_checkpoint

    if procs.is_main:
        save_checkpoint(run_dir, **kwargs)
    procs.barrier()



def _build(cfg: PPORunConfig, device):
    """(tokenizer, policy with its value head, frozen reference, optimizer, constant schedule, KL controller)."""
    import torch

    from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
    from preftune.rl.ppo_math import AdaptiveKLController, FixedKLController
    from preftune.rl.ppo_steps import PolicyWithValue
    from preftune.train.optim import build_optimizer

    s = cfg.ppo
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = PolicyWithValue(load_causal_lm(cfg.model, seed=cfg.train.seed,
                                           trust_remote_code=cfg.trust_remote_code)).to(device)
    reference = load_reference(cfg.ref_model or cfg.model, seed=cfg.train.seed,
                               trust_remote_code=cfg.trust_remote_code).to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                TrainConfig(lr=s.lr, optimizer=cfg.train.optimizer, weight_decay=cfg.train.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    kl_ctl = AdaptiveKLController(s.kl_coef, s.target_kl, s.horizon) if s.adaptive_kl else FixedKLController(s.kl_coef)
    return tokenizer, model, reference, optimizer, scheduler, kl_ctl


def _save_outputs(cfg: PPORunConfig, model, tokenizer, run_dir: Path) -> None:
    """RUN/policy (HF format), the training plot and RUN/value_head.safetensors."""
    from safetensors.torch import save_file

    from preftune.eval.plots import plot_training
    from preftune.models.save import save_policy
    from preftune.train.rundir import read_metrics
    from preftune.train.trackers import close_trackers

    save_policy(cfg, model.policy, tokenizer, run_dir)
    if cfg.run.plot:
        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", kind="ppo")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
              str(run_dir / "value_head.safetensors"))
    close_trackers(run_dir, run_dir / "training.png" if cfg.run.plot else None)


CONFIG = PPORunConfig  # this command's config (configs/*.yaml that name `command: ppo` parse with it)
