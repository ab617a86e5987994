"""``preftune reward``: train a Bradley-Terry reward model on preference pairs (the RLHF baseline's first stage).

The same pieces as DPO: ``read_preference_pairs`` + ``tokenize_pair`` + ``collate_pairs`` (a stacked (2B, T)
batch, chosen rows first) and the one ``fit`` loop; the loss and metrics are ``train/objectives.py``'s
``reward_*``. The head is a trainable parameter like the backbone, so checkpoints and ``--resume`` cover it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from preftune.config import DataConfig, RunConfig, TrainConfig
from preftune.errors import ConfigError
from preftune.recipes.common import register_training, start_training_run

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Train a Bradley-Terry reward model on preference pairs (the RLHF baseline's first stage): the policy model's
decoder body + a scalar head read at the last token of each sequence, trained with -log σ(r(x, y_w) - r(x, y_l)).
Takes the same data as `preftune dpo`. Writes RUN/reward_model/ (HF format + reward_head.safetensors +
reward_config.json); score samples with `preftune score FILE --scorer rm:RUN/reward_model`."""

_NOTES = """\
  not used here (refused when set): ref_model, dpo.*, reference.*, lora.*; train.layout must be auto or padded
  (run.plot has no effect here: reward runs write no plot)
metrics: loss, accuracy (r_w > r_l), rewards/chosen, rewards/rejected, rewards/margins; eval/... on held-out
pairs (data.eval or data.eval_fraction)
"""


@dataclass
class RewardSettings:
    # after training, store the mean/std of the raw rewards of the training responses (chosen and rejected) in
    # reward_config.json; scorers then report (r - mean) / std (the raw score stays available)
    normalize: bool = True
    # normal: N(0, 1/(H+1)) seeded by train.seed (Stiennon et al. 2020) | zeros: every score starts at 0 (loss log 2)
    head_init: str = "normal"


@dataclass
class RewardRunConfig:
    """``preftune reward``'s config: the sections it reads (it fine-tunes all weights with the Bradley-Terry loss,
    without a reference)."""

    COMMAND: ClassVar[str] = "reward"

    model: str = "smollm2-135m"  # alias (smollm2-135m, tiny), local HF dir, .gguf file, or hub id
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardSettings = field(default_factory=RewardSettings)
    run: RunConfig = field(default_factory=RunConfig)


def check_config(cfg: RewardRunConfig) -> None:
    """Checked before anything loads."""
    from preftune.models.reward_model import HEAD_INITS

    if cfg.reward.head_init not in HEAD_INITS:
        raise ConfigError(f"config key 'reward.head_init': {cfg.reward.head_init!r} is not one of "
                          f"{', '.join(HEAD_INITS)}")
    # prefix-shared rows (a DPO speed layout) would need one score per segment; the reward model reads one per row
    if cfg.train.layout not in ("auto", "padded"):
        raise ConfigError("config key 'train.layout': reward training uses the padded layout (auto or padded)")



def register(sub) -> None:
    register_training(sub, "reward", help="train a Bradley-Terry reward model on preference pairs",
                      description=_DESCRIPTION, config=RewardRunConfig, run=run, epilog=_NOTES, check=check_config)


def run(cfg: RewardRunConfig, *, resume: bool = False) -> dict:
    """Train a reward model; writes ``RUN/reward_model/`` and returns a summary dict."""
    from preftune.data.collate import collate_pairs
    from preftune.data.splits import load_tokenized_pairs
    from preftune.models.load import load_tokenizer
    from preftune.models.reward_model import build_reward_model, training_normalization
    from preftune.train.distributed import Processes, check_sharding
    from preftune.train.loop import fit
    from preftune.train.trackers import close_trackers
    from preftune.train.objectives import evaluate_reward, pair_weight, reward_step
    from preftune.train.runtime import pick_device, prepare_for_training, resolve_precision, setup_threads

    check_config(cfg)
    setup_threads(cfg)
    procs = Processes.from_env(cfg.train.device, cfg.train.sharding)
    check_sharding(procs, cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items, run_dir = start_training_run(cfg, procs, "reward", resume, load_tokenized_pairs, tokenizer)
    device = pick_device(cfg, procs)
    precision = resolve_precision(cfg, device)
    log.info("reward model on %s: %d train / %d eval pairs, device=%s precision=%s", cfg.model,
             len(train_items), len(eval_items), device, precision)
    model = build_reward_model(cfg.model, seed=cfg.train.seed, head_init=cfg.reward.head_init,
                               trust_remote_code=cfg.trust_remote_code)
    d = cfg.data
    model.info.update(base_model=cfg.model, append_eos=d.append_eos,
                      max_length=d.max_length, max_prompt_tokens=d.max_prompt_tokens)
    model = model.to(procs.load_device(device))  # FSDP2: sharded onto the device by procs.wrap
    prepare_for_training(model.backbone, cfg, procs)
    pad_id = tokenizer.pad_token_id
    stepped = procs.wrap(model, cfg.train) if procs.world > 1 else model  # FSDP2 shards it in place: stepped is model
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_reward, procs.evaluated(model), eval_items,
                                    pad_id, cfg.train.eval_batch_size, device, precision, procs)
    result = fit(model=model, items=train_items, collate=functools.partial(collate_pairs, pad_id=pad_id),
                 step_fn=functools.partial(reward_step, stepped), weight_fn=pair_weight,
                 cfg=cfg.train, run_dir=run_dir, eval_fn=eval_fn, resume=resume, device=device,
                 precision=precision, procs=procs)
    model.normalization = (training_normalization(model, train_items, cfg.train.eval_batch_size)
                           if cfg.reward.normalize and cfg.train.save_final else None)
    path = run_dir / "reward_model"
    if cfg.train.save_final:  # false: metrics only, as for dpo and sft
        whole = procs.unsharded(model, lambda: _fresh_reward_model(cfg, model))
        if procs.is_main:
            from preftune.models.card import model_card

            whole.save(path, tokenizer, card=model_card(run_dir, "reward model"))
    close_trackers(run_dir)
    procs.barrier()
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval,
            "reward_model": str(path) if cfg.train.save_final else None, "normalization": model.normalization}


def _fresh_reward_model(cfg: RewardRunConfig, trained):
    """An unsharded reward model of ``trained``'s shape carrying its info and normalisation (the weights are loaded
    into it by ``Processes.unsharded``)."""
    from preftune.models.reward_model import build_reward_model

    fresh = build_reward_model(cfg.model, seed=cfg.train.seed, head_init=cfg.reward.head_init,
                               trust_remote_code=cfg.trust_remote_code)
    fresh.info, fresh.normalization, fresh.tokenizer = dict(trained.info), trained.normalization, trained.tokenizer
    return fresh


CONFIG = RewardRunConfig  # this command's config (configs/*.yaml that name `command: reward` parse with it)
