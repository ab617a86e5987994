"""A run's data: read, validate and tokenise its files under ``data.*``, and hold out an eval split."""

from __future__ import annotations

import functools
import logging

import torch

from preftune.config import Config
from preftune.data.records import read_preference_pairs, read_sft_examples
from preftune.data.tokenize import (TokenizedExample, TokenizedPair, TruncationStats, tokenize_example,
                                    tokenize_pair)
from preftune.errors import DataError, InputError

log = logging.getLogger(__name__)


def split_eval(items: list, fraction: float, seed: int, source: str = "data.train") -> tuple[list, list]:
    """Hold out a deterministic ``fraction`` of ``items`` (read from ``source``) for evaluation: at least one, and
    never all of them (an InputError)."""
    if fraction <= 0:
        return items, []
    n_eval = max(1, int(round(fraction * len(items))))
    if n_eval >= len(items):
        raise InputError(f"{source}: data.eval_fraction={fraction} of its {len(items)} items leaves nothing to train "
                         "on (lower it, or give data.eval)")
    gen = torch.Generator().manual_seed(seed + 17)
    perm = torch.randperm(len(items), generator=gen).tolist()
    held = set(perm[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_file(cfg: Config, path: str, read, tokenize, tokenizer, summary: dict | None = None, *,
              role: str = "training") -> tuple[list, object]:
    """Read, validate and tokenise one data file with ``read(path) -> (records, SkipReport)`` and
    ``tokenize(tokenizer, record, **limits)`` under ``cfg.data``'s limits; log skipped records and truncation
    (and put them into ``summary``, with the file's SHA-256). Returns (tokenised items, SkipReport); a file with
    no item left is an InputError naming its ``role`` (training, evaluation): never a run on nothing, nor on
    another split in its place."""
    d = cfg.data
    records, report = read(path)
    stats = TruncationStats()
    items = _without_identical_pairs(
        [tokenize(tokenizer, r, max_length=d.max_length, max_prompt_tokens=d.max_prompt_tokens,
                  prompt_overflow=d.prompt_overflow, append_eos=d.append_eos, stats=stats) for r in records], cfg, report)
    if report.skipped:
        log.warning("%s: %s", path, report.summary())
    if stats.prompts_truncated or stats.responses_truncated:
        log.warning("%s: %s", path, stats.summary())
    if not items:
        raise InputError(f"{path}: no {role} items left ({report.summary() if report.skipped else 'empty'})")
    if summary is not None:
        summary.update(path=str(path), sha256=file_sha256(path), records_read=report.total, items=len(items),
                       skipped=report.skipped, skip_reasons=dict(report.reasons),
                       prompts_truncated=stats.prompts_truncated, responses_truncated=stats.responses_truncated)
    return items, report


def _without_identical_pairs(items: list, cfg: Config, report) -> list:
    """Pairs whose chosen and rejected tokens are the same once tokenised and cut to ``data.max_length`` (responses
    that differ only past the cut) carry no training signal but would count in the loss mean and the accuracy: a
    located error, or under ``on_invalid=skip`` skipped and counted like any invalid record."""
    kept = []
    for item in items:
        if not isinstance(item, TokenizedPair) or item.chosen_ids != item.rejected_ids:
            kept.append(item)
            continue
        file, _, line = item.source.rpartition(":")
        err = DataError(file, int(line) if line.isdigit() else None, "rejected",
                        f"identical to chosen once tokenised and cut to data.max_length={cfg.data.max_length} "
                        "(no training signal)", reason="chosen and rejected tokens identical after truncation")
        if cfg.data.on_invalid != "skip":
            err.hint = "raise data.max_length, or data.on_invalid=skip skips such pairs"
            raise err
        report.add(err)
    return kept


def file_sha256(path: str) -> str | None:
    """A data file's content hash (None for a directory, e.g. a saved ``datasets`` one)."""
    import hashlib
    from pathlib import Path

    path = Path(str(path).split("::")[0])
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_splits(cfg: Config, read, tokenize, tokenizer, summary: dict | None = None) -> tuple[list, list]:
    """``data.train`` and ``data.eval`` through :func:`load_file`; hold out ``data.eval_fraction`` of train when no
    eval file is given. ``summary`` (a dict) receives what each file gave (``train``, ``eval``) and the item counts
    trained and evaluated on: what a run writes to RUN/data.json and its model card reports."""
    d = cfg.data
    if not d.train:
        raise InputError("no training data: set data.train=PATH")
    files: dict[str, dict] = {}
    train = load_file(cfg, d.train, read, tokenize, tokenizer, files.setdefault("train", {}))[0]
    evals = (load_file(cfg, d.eval, read, tokenize, tokenizer, files.setdefault("eval", {}), role="evaluation")[0]
             if d.eval else [])
    if not d.eval and d.eval_fraction > 0:
        train, evals = split_eval(train, d.eval_fraction, cfg.train.seed, source=d.train)
    if summary is not None:
        summary.update(files={k: v for k, v in files.items() if v}, train_items=len(train), eval_items=len(evals),
                       eval_held_out_of_train=bool(evals) and not d.eval)
    return train, evals


def write_data_summary(run_dir, summary: dict, procs) -> None:
    """RUN/data.json: the data a run read (process 0 writes it)."""
    import json

    from preftune.train.rundir import atomic_write_text

    if procs.is_main and summary:
        atomic_write_text(run_dir / "data.json", json.dumps(summary, indent=2))


def pair_reader(cfg: Config):
    """``read(path) -> (pairs, SkipReport)`` under ``cfg.data``'s validation settings."""
    d = cfg.data
    return functools.partial(read_preference_pairs, on_invalid=d.on_invalid, limit=d.limit,
                             max_pairs_per_prompt=d.max_pairs_per_prompt)


def load_tokenized_pairs(cfg: Config, tokenizer, summary: dict | None = None
                         ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Read, validate and tokenise the train and eval preference pairs; report skipped rows and truncation."""
    return load_splits(cfg, pair_reader(cfg), tokenize_pair, tokenizer, summary)


def load_tokenized_examples(cfg: Config, tokenizer, summary: dict | None = None
                            ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """The same for SFT examples (``{prompt, completion}``, ``{messages}``, or pairs' chosen responses)."""
    read = functools.partial(read_sft_examples, on_invalid=cfg.data.on_invalid, limit=cfg.data.limit)
    return load_splits(cfg, read, tokenize_example, tokenizer, summary)


def resolve_epochs(cfg, n_items: int, processes: int = 1) -> None:
    """``train.epochs`` as ``train.max_steps`` (a step sees batch_size x grad_accum_steps x processes items)."""
    t = cfg.train
    if t.epochs is None:
        return
    import math

    per_step = t.batch_size * t.grad_accum_steps * processes
    t.max_steps = max(1, math.ceil(t.epochs * n_items / per_step))
    log.info("train.epochs=%g over %d items, %d per step: train.max_steps=%d", t.epochs, n_items, per_step,
             t.max_steps)
