"""``preftune sft``: supervised fine-tuning on completions (the paper's Preferred-FT when given pairs:
it trains on the chosen responses), which makes the reference model when none exists.

The loss is the mean negative log-likelihood over ALL completion tokens of an optimizer step (the loop
divides the summed NLL by the step's token count), so gradient accumulation does not change it.
"""

from __future__ import annotations

import functools
import logging

import torch

from preftune.config import Config
from preftune.data.collate import batch_to, collate_examples
from preftune.data.records import read_sft_examples
from preftune.data.tokenize import TokenizedExample, tokenize_example
from preftune.models.load import load_causal_lm, load_tokenizer
from preftune.models.logprobs import LogpsModule, module_logps
from preftune.models.lora import apply_lora
from preftune.train.common import load_splits, prepare_for_training, resolve_precision, save_policy, setup_threads
from preftune.train.distributed import Processes
from preftune.train.loop import StepOutput, fit
from preftune.train.rundir import read_metrics

log = logging.getLogger(__name__)


def load_tokenized_examples(cfg: Config, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    read = functools.partial(read_sft_examples, on_invalid=cfg.data.on_invalid, limit=cfg.data.limit)
    return load_splits(cfg, read, tokenize_example, tokenizer)


def sft_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over completion tokens, token count)."""
    out = module_logps(model, batch)
    return -out.logps.sum(), out.n_tokens.sum()


def sft_step(model, batch) -> StepOutput:
    nll, n_tokens = sft_forward(model, batch)
    return StepOutput(loss=nll, stats={"loss": (nll.detach(), n_tokens)},
                      tokens=int(batch["n_positions"]), pairs=int(batch["input_ids"].shape[0]))


def _weight(batch: dict[str, torch.Tensor]) -> float:
    return float((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def evaluate_examples(model, items, pad_id: int, batch_size: int, device: torch.device,
                      procs: Processes | None = None) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity; shared out over several processes."""
    procs = procs if procs is not None else Processes()
    items, shared = procs.eval_shard(items)
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for start in range(0, len(items), batch_size):
        batch = batch_to(collate_examples(items[start:start + batch_size], pad_id), device)
        nll, n = sft_forward(model, batch)
        total, count = total + nll, count + n
    if shared:
        total, count = procs.sum_stats({"loss": (total, count)})["loss"]
    loss = (total / count.clamp(min=1)).item()
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


def run_sft(cfg: Config, *, resume: bool = False) -> dict:
    setup_threads(cfg)
    procs = Processes.from_env(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, eval_items = load_tokenized_examples(cfg, tokenizer)
    run_dir = procs.run_dir(cfg, "sft", resume)
    device = procs.pick_device(cfg)
    precision = resolve_precision(cfg, device)
    log.info("SFT on %s: %d train / %d eval examples, device=%s precision=%s", cfg.model, len(train_items),
             len(eval_items), device, precision)
    model = load_causal_lm(cfg.model, seed=cfg.train.seed, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, seed=cfg.train.seed)
    model = prepare_for_training(model.to(device), cfg)
    pad_id = tokenizer.pad_token_id
    eval_fn = None
    if eval_items:
        eval_fn = functools.partial(evaluate_examples, model, eval_items, pad_id, cfg.train.eval_batch_size, device,
                                    procs)
    stepped = procs.wrap(LogpsModule(model)) if procs.world > 1 else model
    result = fit(model=model, items=train_items, collate=functools.partial(collate_examples, pad_id=pad_id),
                 step_fn=functools.partial(sft_step, stepped), weight_fn=_weight, cfg=cfg.train, run_dir=run_dir,
                 eval_fn=eval_fn, resume=resume, device=device, precision=precision, procs=procs)
    if procs.is_main and cfg.train.save_final:
        save_policy(cfg, model, tokenizer, run_dir)
    procs.barrier()
    if procs.is_main and cfg.run.plot:
        from preftune.eval.plots import plot_training

        plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", kind="sft")
    return {"run_dir": str(run_dir), "step": result.step, "train": result.last_metrics, "eval": result.last_eval}
