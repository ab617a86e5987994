"""``preftune sample``: prompts JSONL in, completions JSONL out (batched, KV cache)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("sample", help="batched sampling (KV cache) from a model",
                       description="Sample completions for prompts. Input JSONL rows need `prompt` (a string or "
                                   "a list of messages); output rows add `completion` (and `sample` index).")
    p.add_argument("model", help="model spec: alias, HF dir (e.g. RUN/policy), .gguf or hub id")
    p.add_argument("--prompts", required=True, help="JSONL file with a `prompt` field per line")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--batch-size", type=int, default=32, help="sequences generated together (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: run(
        model=args.model, prompts=args.prompts, out=args.out, num_samples=args.num_samples,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed) and 0)


def run(*, model: str, prompts: str, out: str, num_samples: int = 1, temperature: float = 1.0,
        top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0) -> int:
    """Sample ``num_samples`` completions per prompt of the ``prompts`` file into ``out``; returns the count."""
    from preftune.data.records import read_prompts, write_jsonl
    from preftune.eval.sampling import generate
    from preftune.models.load import load_causal_lm, load_tokenizer
    from preftune.train.runtime import pick_device

    from preftune.errors import InputError

    for name, value, ok, rule in (("--num-samples", num_samples, num_samples >= 1, ">= 1"),
                                  ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
                                  ("--batch-size", batch_size, batch_size >= 1, ">= 1"),
                                  ("--temperature", temperature, temperature >= 0, ">= 0 (0 is greedy)"),
                                  ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]")):
        if not ok:  # a negative temperature was greedy decoding, --num-samples 0 an empty file
            raise InputError(f"{name} {value}: must be {rule}")
    rows = read_prompts(prompts)
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model, seed=seed).to(pick_device())
    samples = generate(lm, tokenizer, rows, num_samples=num_samples, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    write_jsonl(out, ({"prompt": s.prompt, "completion": s.completion, "sample": i % num_samples}
                      for i, s in enumerate(samples)))
    log.info("wrote %d samples to %s", len(samples), out)
    return len(samples)
