"""PPO's settings (the ``ppo:`` section of ``preftune ppo``'s config) and their checks; the recipe is
``preftune.recipes.ppo``, the maths ``ppo_math`` and the per-iteration steps ``ppo_steps``."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.errors import ConfigError


@dataclass
class PPOSettings:
    prompts: str = "rotten_tomatoes"  # rotten_tomatoes (held-out RT snippet openings) | a JSONL file with `prompt`
    num_prompts: int = 1024  # size of the prompt pool (a JSONL file: its first N)
    scorer: str = "sentiment"  # sentiment (ground-truth oracle, "PPO-GT") | vader | rm:PATH (a reward model)
    iterations: int = 100  # rollout -> update rounds
    batch_size: int = 16  # prompts per iteration, one completion each
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch_size: int = 8  # samples per optimizer step (must divide batch_size)
    lr: float = 1e-5  # learning rate (policy and value head)
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # value loss weight
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.1  # per-token KL penalty coefficient (the initial one when adaptive)
    adaptive_kl: bool = False  # Ziegler et al.'s controller towards target_kl
    target_kl: float = 6.0  # nats per sequence
    horizon: int = 10000  # the adaptive controller's horizon, in samples
    whiten_rewards: bool = False  # rescale per-token rewards (mean kept) before GAE
    max_new_tokens: int = 24  # completion length limit
    temperature: float = 1.0  # log-probs are those of the policy at temperature 1: other values make PPO off-policy
    generation_batch_size: int = 64  # sequences sampled (and scored by no-grad forwards) together
    eval_every: int = 0  # the in-process eval hook's cadence (recipes.ppo.run(cfg, eval_hook=...)); 0: never
    save_every: int = 0  # checkpoint every N iterations (0: only at the end)


def check_ppo_settings(s: PPOSettings) -> None:
    """Each ``ppo.*`` value in its range, and a minibatch size that divides the batch; before anything loads."""
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
