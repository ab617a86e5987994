"""Benchmark workloads: which model, how many pairs per step, how many prompt and response tokens, which device.

Each workload's data is exactly one batch (``n_pairs`` pairs, batch size ``n_pairs``), so every optimizer step of
every system processes the same sequences (only their order inside the batch differs) and the same number of
tokens, whatever the systems' data order. The text is deterministic synthetic review text (Rotten Tomatoes
snippets shipped with the oracle's data): prompt = a run of review words, chosen = words from positive reviews,
rejected = words from negative reviews, each cut to its token target with the model's tokenizer and then checked
with preftune's own tokenisation.

Models: ``smollm2-135m`` (the embedded model, converted once to an HF directory that both systems load), ``tiny``
(preftune's random 2-layer Llama), or ``llama:<shape>``: a Llama-shaped model with random weights built from
``LLAMA_SHAPES`` and the SmolLM2 tokenizer's vocabulary, saved once (fp32) so both systems load the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# hidden, intermediate, layers, attention heads, key/value heads (GQA); tied embeddings, vocabulary 49152
LLAMA_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 2),  # ~3.2M parameters (3.1M of them the embedding): CPU tests of the GPU code path
    "0.4b": (1024, 3072, 28, 16, 8),  # ~0.40B
    "1.5b": (2048, 5632, 32, 32, 8),  # ~1.54B
}
MAX_POSITIONS = 8192


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # preftune model spec, or llama:<shape> (random weights, LLAMA_SHAPES)
    n_pairs: int  # pairs per optimizer step = the whole data set
    prompt_tokens: int  # target prompt length (tokens, as preftune tokenises it)
    response_tokens: int  # target chosen / rejected length, EOS included
    device: str  # cpu | cuda
    warmup_steps: int
    timed_steps: int
    quick: tuple[int, int] | None = None  # (warm-up, timed) steps under --quick; None: not part of --quick
    hidden: bool = False  # tests only: never selected by default
    note: str = ""


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("cpu-short", "smollm2-135m", 4, 20, 50, "cpu", 2, 6, quick=(2, 3),
             note="the issue's measurement: ~70 tokens per sequence"),
    Workload("cpu-long-prompt", "smollm2-135m", 4, 400, 40, "cpu", 1, 3,
             note="long shared prompt, short responses"),
    Workload("gpu-0.4b-short", "llama:0.4b", 8, 128, 128, "cuda", 3, 10, quick=(2, 3)),
    Workload("gpu-0.4b-2k", "llama:0.4b", 8, 512, 1536, "cuda", 3, 10),
    Workload("gpu-1.5b-short", "llama:1.5b", 8, 128, 128, "cuda", 3, 10),
    Workload("gpu-1.5b-2k", "llama:1.5b", 8, 512, 1536, "cuda", 3, 10),
    Workload("gpu-1.5b-long-prompt", "llama:1.5b", 8, 2048, 128, "cuda", 3, 10),
    Workload("tiny-cpu", "llama:tiny", 2, 12, 16, "cpu", 1, 2, quick=(1, 2), hidden=True,
             note="tests: random tiny Llama through the same path as the GPU workloads"),
)}


def default_workloads(quick: bool, cuda: bool) -> list[str]:
    """The workloads a plain ``preftune bench`` runs: those for the device present (GPU workloads need CUDA)."""
    device = "cuda" if cuda else "cpu"
    return [w.name for w in WORKLOADS.values()
            if not w.hidden and w.device == device and (not quick or w.quick is not None)]


def llama_config(shape: str, tokenizer):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads = LLAMA_SHAPES[shape]
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, attention_dropout=0.0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def prepare_model(spec: str, root: Path, *, seed: int = 0) -> str:
    """A local HF directory holding the workload's model (fp32) and tokenizer, which both systems load."""
    import torch

    from preftune.models.load import TINY_ALIAS, load_causal_lm, load_tokenizer, resolve_spec

    if spec != TINY_ALIAS and not spec.startswith("llama:"):
        return resolve_spec(spec)
    target = root / ("tiny" if spec == TINY_ALIAS else spec.replace(":", "-"))
    if (target / "config.json").is_file():
        return str(target)
    tokenizer = load_tokenizer(TINY_ALIAS)  # the embedded SmolLM2 tokenizer
    if spec == TINY_ALIAS:
        model = load_causal_lm(TINY_ALIAS, seed=seed)
    else:
        from transformers import LlamaForCausalLM

        config = llama_config(spec.split(":", 1)[1], tokenizer)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1.5B weights is slow on a CPU
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(torch.float32)
        model = model.cpu()
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the children need the GPU memory, not this parent's allocator cache
    return str(target)


def _word_streams() -> tuple[list[str], list[str], list[str]]:
    from preftune.eval.scorers import rotten_tomatoes_snippets

    snippets = rotten_tomatoes_snippets("train")
    every = [w for text, _ in snippets for w in text.split()]
    fresh = [w for text, label in snippets if label == 1 for w in text.split()]
    rotten = [w for text, label in snippets if label == 0 for w in text.split()]
    return every, fresh, rotten


def _take(words: list[str], start: int, target: int, count) -> tuple[str, int]:
    """The longest run of words from ``start`` whose token count (``count(text)``) is at most ``target``;
    returns (text, words used). Binary search over the number of words."""
    lo, hi = 1, max(2, target * 2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[start:start + mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[start:start + lo]), lo


def make_records(tokenizer, workload: Workload) -> list[dict[str, str]]:
    """``n_pairs`` plain-string {prompt, chosen, rejected} records with the workload's token lengths.

    Plain strings (not conversations) so that preftune and TRL tokenise them identically: a prompt that ends in a
    word and responses that start with a space split at the boundary in the byte-level BPE, and both systems end a
    response with the EOS id (checked per workload by the TRL child, reported as ``tokens_match``)."""
    every, fresh, rotten = _word_streams()
    n_prompt = lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])  # noqa: E731
    n_response = lambda text: len(tokenizer(" " + text, add_special_tokens=False)["input_ids"]) + 1  # noqa: E731
    records, cursors = [], [len(every) // 2, 0, 0]  # prompts from the middle: not the responses' opening words
    for _ in range(workload.n_pairs):
        prompt, used = _take(every, cursors[0], workload.prompt_tokens, n_prompt)
        cursors[0] += used
        chosen, used = _take(fresh, cursors[1], workload.response_tokens, n_response)
        cursors[1] += used
        rejected, used = _take(rotten, cursors[2], workload.response_tokens, n_response)
        cursors[2] += used
        records.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return records


def sequence_budget(workload: Workload) -> tuple[int, int]:
    """(max_length, max_prompt_tokens) generous enough that nothing is truncated by either system."""
    max_prompt = workload.prompt_tokens + 16
    return max_prompt + workload.response_tokens + 16, max_prompt


def tokenize_records(tokenizer, records: list[dict[str, str]], workload: Workload) -> dict:
    """preftune's tokenisation of the records, the per-step token counts, and a check of the length targets."""
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import TruncationStats, tokenize_pair

    max_length, max_prompt = sequence_budget(workload)
    stats = TruncationStats()
    items = [tokenize_pair(tokenizer, PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"bench:{i}"),
                           max_length=max_length, max_prompt_tokens=max_prompt, stats=stats)
             for i, r in enumerate(records)]
    assert not (stats.prompts_truncated or stats.responses_truncated), stats.summary()
    n = len(items)
    prompt = sum(len(p.prompt_ids) for p in items) / n
    response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in items) / (2 * n)
    for name, got, want in (("prompt", prompt, workload.prompt_tokens),
                            ("response", response, workload.response_tokens)):
        if abs(got - want) > max(2.0, 0.1 * want):
            raise AssertionError(f"{workload.name}: mean {name} length {got:.1f} tokens, target {want}")
    return {
        "ids": [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in items],
        "prompt_tokens_mean": prompt, "response_tokens_mean": response,
        # non-padding tokens of the 2B chosen + rejected sequences: what the policy processes per step
        "tokens_per_step": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items),
        "completion_tokens_per_step": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in items),
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
