"""``preftune sample``: prompts JSONL in, completions JSONL out."""

from __future__ import annotations

import logging

from preftune.data.records import DataError, read_jsonl, write_jsonl
from preftune.eval.sampling import generate
from preftune.models.load import load_causal_lm, load_tokenizer
from preftune.train.common import pick_device

log = logging.getLogger(__name__)


def read_prompts(path: str) -> list:
    """The ``prompt`` field of each row: a non-empty string or a non-empty list of messages."""
    prompts = []
    for i, row in enumerate(read_jsonl(path), start=1):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(str(path), i, "prompt", "missing, empty, or not a string / list of messages")
        prompts.append(prompt)
    if not prompts:
        raise DataError(str(path), None, None, "no prompts")
    return prompts


def run_sample(*, model: str, prompts: str, out: str, num_samples: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0) -> int:
    rows = read_prompts(prompts)
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model, seed=seed).to(pick_device())
    samples = generate(lm, tokenizer, rows, num_samples=num_samples, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    write_jsonl(out, ({"prompt": s.prompt, "completion": s.completion, "sample": i % num_samples}
                      for i, s in enumerate(samples)))
    log.info("wrote %d samples to %s", len(samples), out)
    return len(samples)
