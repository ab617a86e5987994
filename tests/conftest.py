"""Shared fixtures. Tests run on the `tiny` model (random 2-layer Llama, embedded tokenizer) unless marked slow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

PAIRS = [
    {"prompt": "The movie was", "chosen": " wonderful and moving.", "rejected": " dull and far too long."},
    {"prompt": "I thought the acting", "chosen": " was superb throughout.", "rejected": " was wooden and flat."},
    {"prompt": "This film", "chosen": " is a delight from start to end.", "rejected": " is a mess."},
    {"prompt": "Overall the story", "chosen": " kept me hooked.", "rejected": " put me to sleep twice."},
    {"prompt": "The soundtrack", "chosen": " soars.", "rejected": " grates on the ears after a while."},
    {"prompt": "Its director", "chosen": " knows exactly what she is doing.", "rejected": " lost the plot."},
    {"prompt": [{"role": "user", "content": "Review the film in a few words."}],
     "chosen": [{"role": "assistant", "content": "Great fun for everyone."}],
     "rejected": [{"role": "assistant", "content": "Boring."}]},
    {"prompt": "In the end", "chosen": " I was moved to tears.", "rejected": " I wanted my money back."},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from preftune.models.load import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny_model():
    from preftune.models.load import load_causal_lm

    return load_causal_lm("tiny", seed=0)


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
