"""``preftune reward``: train a Bradley-Terry reward model on preference pairs (the RLHF baseline's first stage).

The same pieces as DPO: ``read_preference_pairs`` + ``tokenize_pair`` + ``collate_pairs`` (a stacked (2B, T)
batch, chosen rows first) and the one ``fit`` loop. The loss per pair is the Bradley-Terry negative
log-likelihood ``-log σ(r(x, y_w) - r(x, y_l))`` (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020), summed per
micro-batch; ``fit`` divides by the step's pair count. Metrics: ``loss``, ``accuracy`` (r_w > r_l, ties count
as wrong), ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (raw rewards); held-out pairs the same
under ``eval/``. The head is a trainable parameter like the backbone, so checkpoints and ``--resume`` cover it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from preftune.config import Config, ConfigError
from preftune.data.collate import batch_to, collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.models.load import load_tokenizer
from preftune.models.logprobs import autocast_context
from preftune.models.reward_model import HEAD_INITS, RewardModel, build_reward_model, reward_statistics
from preftune.train.common import prepare_for_training, resolve_precision, setup_threads
from preftune.train.distributed import Processes
from preftune.train.dpo import load_tokenized_pairs
from preftune.train.loop import StepOutput, fit

log = logging.getLogger(__name__)
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RewardSettings:
    # after training, store the mean/std of the raw rewards of the training responses (chosen and rejected) in
    # reward_config.json; scorers then report (r - mean) / std (the raw score stays available)
    normalize: bool = True
    # normal: N(0, 1/(H+1)) seeded by train.seed (Stiennon et al. 2020) | zeros: every score starts at 0 (loss log 2)
    head_init: str = "normal"


@dataclass
class RewardRunConfig(Config):
    """The shared config plus a ``reward:`` section. ``dpo``, ``ref_model``, ``reference`` and ``lora`` do not
    apply to reward training and are refused when set."""

    reward: RewardSettings = field(default_factory=RewardSettings)


def check_config(cfg: Config) -> None:
    """Checked before anything loads. An option reward training would ignore is refused, never silently dropped."""
    if isinstance(cfg, RewardRunConfig) and cfg.reward.head_init not in HEAD_INITS:
        raise ConfigError(f"config key 'reward.head_init': {cfg.reward.head_init!r} is not one of "
                          f"{', '.join(HEAD_INITS)}")
    defaults = Config()
    for key in ("ref_model", "dpo", "reference", "lora"):
        if getattr(cfg, key) != getattr(defaults, key):
            raise ConfigError(f"config key '{key}' does not apply to reward training (it fine-tunes all weights "
                              "with the Bradley-Terry loss, without a reference): leave it at its default")
    # prefix-shared rows (a DPO speed layout) would need one score per segment; the reward model reads one per row
    if getattr(cfg.train, "layout", "auto") not in ("auto", "padded"):
        raise ConfigError("config key 'train.layout': reward training uses the padded layout (auto or padded)")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(B,) -log σ(r_w - r_l) for (B,) rewards, computed stably (logsigmoid)."""
    assert chosen_rewards.shape == rejected_rewards.shape and chosen_rewards.dim() == 1
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards)


def reward_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    """Per-pair losses (B,) and (sum, count) metrics for a stacked (2B, T) batch: one forward over all rows."""
    n = batch["input_ids"].shape[0] // 2
    rewards = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
    chosen, rejected = rewards[:n], rewards[n:]
    losses = bradley_terry_loss(chosen, rejected)
    c, r = chosen.detach(), rejected.detach()
    count = torch.tensor(float(n), device=rewards.device)
    stats = {
        "loss": (losses.detach().sum(), count),
        "accuracy": ((c > r).float().sum(), count),
        "rewards/chosen": (c.sum(), count),
        "rewards/rejected": (r.sum(), count),
        "rewards/margins": ((c - r).sum(), count),
    }
    return losses, stats


def reward_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    losses, stats = reward_forward(model, batch)
    return StepOutput(loss=losses.sum(), stats=stats, tokens=int(batch["n_positions"]),
                      pairs=int(batch["input_ids"].shape[0] // 2))


@torch.no_grad()
def evaluate_reward(model: torch.nn.Module, items: list[TokenizedPair], pad_id: int, batch_size: int,
                    device: torch.device, precision: str = "fp32", procs: Processes | None = None) -> dict[str, float]:
    """Held-out pairwise metrics, averaged exactly over all pairs, under the training precision; shared out over
    several processes."""
    procs = procs if procs is not None else Processes()
    items, shared = procs.eval_shard(items)
    was_training = model.training
    model.eval()
    acc: Stats = {}
    for start in range(0, len(items), batch_size):
        batch = batch_to(collate_pairs(items[start:start + batch_size], pad_id), device)
        with autocast_context(device, precision):
            _, stats = reward_forward(model, batch)
        for name, (s, c) in stats.items():
            acc[name] = (acc[name][0] + s, acc[name][1] + c) if name in acc else (s, c)
    model.train(was_training)
    acc = procs.sum_stats(acc) if shared else acc
    return {name: (s / c).item() for name, (s, c) in acc.items()}


def training_normalization(model: RewardModel, items: list[TokenizedPair], batch_size: int) -> dict[str, float]:
    """Mean/std of the raw fp32 rewards of every training response (chosen and rejected), computed by the
    same path that scores at inference (``score_ids``), so normalised inference scores are centred on them."""
    prompts = [p.prompt_ids for p in items] * 2
    completions = [p.chosen_ids for p in items] + [p.rejected_ids for p in items]
    return reward_statistics(model.score_ids(prompts, completions, normalized=False, batch_size=batch_size))


def run_reward(cfg: Config, *, resume: bool = False) -> dict:
    """Train a reward model; writes ``RUN/reward_model/`` and returns a summary dict."""
    check_config(cfg)
    settings = cfg.reward if isinstance(cfg, RewardRunConfig) else RewardSettings()
    setup_threads(cfg)
    procs = Processes.from_env(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_tokenized_pairs(cfg, tokenizer)
    run_dir = procs.run_dir(cfg, "reward", resume)
    device = procs.pick_device(cfg)
    precision = resolve_precision(cfg, device)
    log.info("reward model on %s: %d train / %d eval pairs, device=%s precision=%s", cfg.model,
             len(train_items), len(eval_items), device, precision)
    model = build_reward_model(cfg.model, seed=cfg.train.seed, head_init=settings.head_init,
                               trust_remote_code=cfg.trust_remote_code)
    d = cfg.data
    model.info.update(base_model=cfg.model, append_eos=d.append_eos,
                      max_length=d.max_length, max_prompt_tokens=d.max_prompt_tokens)
    model = model.to(device)
    prepare_for_training(model.backbone, cfg)
    pad_id = tokenizer.pad_token_id
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_reward, model, eval_items, pad_id, cfg.train.eval_batch_size,
                                    device, precision, procs)
    stepped = procs.wrap(model) if procs.world > 1 else model
    result = fit(model=model, items=train_items, collate=functools.partial(collate_pairs, pad_id=pad_id),
                 step_fn=functools.partial(reward_step, stepped), weight_fn=lambda b: float(b["n_pairs"]),
                 cfg=cfg.train, run_dir=run_dir, eval_fn=eval_fn, resume=resume, device=device,
                 precision=precision, procs=procs)
    model.normalization = (training_normalization(model, train_items, cfg.train.eval_batch_size)
                           if settings.normalize else None)
    path = run_dir / "reward_model"
    if procs.is_main:
        model.save(path, tokenizer)
    procs.barrier()
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval,
            "reward_model": str(path), "normalization": model.normalization}
