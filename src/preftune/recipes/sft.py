"""``preftune sft``: supervised fine-tuning on completions (the paper's Preferred-FT when given pairs: it trains on
the chosen responses), which makes the reference model when none exists.

The loss is the mean negative log-likelihood over ALL completion tokens of an optimizer step, so gradient
accumulation does not change it (``train/objectives.py``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from preftune.config import DataConfig, LoRAConfig, RunConfig, TrainConfig
from preftune.recipes.common import (finish_policy_run, refuse_idle_lora_settings, refuse_unread, register_training,
                                     start_training_run)

log = logging.getLogger(__name__)
HELP = "supervised fine-tuning on completions (Preferred-FT on pairs' chosen)"


@dataclass
class SFTRunConfig:
    """``preftune sft``'s config: the sections it reads (no reference and no preference loss)."""

    COMMAND: ClassVar[str] = "sft"

    model: str = "smollm2-135m"  # alias (smollm2-135m, tiny), local HF dir, .gguf file, or hub id
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)



def check_config(cfg: SFTRunConfig) -> None:
    """Checked before anything loads: the keys SFT shares with DPO but cannot honour."""
    from preftune.errors import ConfigError

    if cfg.train.layout not in ("auto", "padded"):  # prefix sharing and packing are DPO's row layouts
        raise ConfigError("config key 'train.layout': SFT trains on padded rows, one per example (auto or padded)")
    refuse_unread(cfg, "sft", {"data.max_pairs_per_prompt": "it trains on one completion per record"})
    refuse_idle_lora_settings(cfg, "sft")


def register(sub) -> None:
    register_training(sub, "sft", help=HELP, description=f"{HELP}.", config=SFTRunConfig, run=run,
                      check=check_config)


def run(cfg: SFTRunConfig, *, resume: bool = False) -> dict:
    from preftune.data.collate import collate_examples
    from preftune.data.splits import load_tokenized_examples
    from preftune.models.load import load_causal_lm, load_tokenizer
    from preftune.models.logprobs import LogpsModule
    from preftune.models.lora import apply_lora
    from preftune.train.distributed import Processes, check_sharding
    from preftune.train.loop import fit
    from preftune.train.objectives import evaluate_examples, sft_step, token_weight
    from preftune.train.runtime import pick_device, prepare_for_training, resolve_precision, setup_threads

    check_config(cfg)
    setup_threads(cfg)
    procs = Processes.from_env(cfg.train.device, cfg.train.sharding)
    check_sharding(procs, cfg)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items, run_dir = start_training_run(cfg, procs, "sft", resume, load_tokenized_examples, tokenizer)
    device = pick_device(cfg, procs)
    precision = resolve_precision(cfg, device)
    log.info("SFT on %s: %d train / %d eval examples, device=%s precision=%s", cfg.model, len(train_items),
             len(eval_items), device, precision)
    model = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, seed=cfg.train.seed)
    model = prepare_for_training(model.to(procs.load_device(device)), cfg, procs)
    pad_id = tokenizer.pad_token_id
    stepped = procs.wrap(LogpsModule(model), cfg.train) if procs.world > 1 else model
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_examples, procs.evaluated(model), eval_items,
                                    pad_id, cfg.train.eval_batch_size, device, procs)
    result = fit(model=model, items=train_items, collate=functools.partial(collate_examples, pad_id=pad_id),
                 step_fn=functools.partial(sft_step, stepped), weight_fn=token_weight, cfg=cfg.train,
                 run_dir=run_dir, eval_fn=eval_fn, resume=resume, device=device, precision=precision, procs=procs)
    finish_policy_run(procs, cfg, model, tokenizer, run_dir, "sft")
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval}


CONFIG = SFTRunConfig  # this command's config (configs/*.yaml that name `command: sft` parse with it)
