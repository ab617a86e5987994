"""The sentiment task of the DPO paper's first experiment (``preftune demo`` and ``preftune frontier``): movie-review
openings as prompts, split into train and held-out, and preference pairs built from the reference's samples ranked
by the sentiment oracle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from preftune.errors import InputError
from preftune.paths import shared_data_dir

if TYPE_CHECKING:  # sampling imports torch; this module is read by the commands' --help
    from preftune.eval.sampling import Sample


@dataclass
class DemoSettings:
    prompts: str = "rotten_tomatoes"  # rotten_tomatoes (shipped snippets) | imdb (../shared/data, as in the paper)
    imdb_path: str | None = None  # default: <shared data>/imdb/reviews.jsonl
    train_prompts: int = 256
    heldout_prompts: int = 64
    samples_per_prompt: int = 4  # reference samples per train prompt, scored to form pairs
    pairs_per_prompt: int = 2  # best vs worst, 2nd best vs 2nd worst, ...
    min_score_gap: float = 0.05  # skip pairs whose oracle scores are closer than this
    eval_samples_per_prompt: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0  # 1.0 keeps the KL estimate unbiased
    generation_batch_size: int = 64


def demo_prompts(d: DemoSettings, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) review openings: Rotten Tomatoes snippets shipped in a wheel, or IMDb reviews."""
    from preftune.eval.prompts import imdb_prompts, rotten_tomatoes_prompts, split_prompts

    n = d.train_prompts + d.heldout_prompts
    if d.prompts == "imdb":
        path = Path(d.imdb_path) if d.imdb_path else shared_data_dir() / "imdb" / "reviews.jsonl"
        prompts = imdb_prompts(path, n, seed=seed)
    elif d.prompts == "rotten_tomatoes":
        prompts = rotten_tomatoes_prompts(n, seed=seed)
    else:
        raise InputError(f"prompts: {d.prompts!r} is not one of rotten_tomatoes, imdb")
    return split_prompts(prompts, d.heldout_prompts / n, seed=seed)


def check_pairing(d: DemoSettings, section: str) -> None:
    """Each sample is in at most one pair (best with worst, ...): ``pairs_per_prompt`` needs twice as many samples.
    Refused when it cannot be met, rather than quietly capped."""
    from preftune.errors import ConfigError

    if not 1 <= d.pairs_per_prompt <= d.samples_per_prompt // 2:
        raise ConfigError(f"config key '{section}.pairs_per_prompt': {d.pairs_per_prompt} pairs a prompt need "
                          f"{2 * d.pairs_per_prompt} samples, {section}.samples_per_prompt is {d.samples_per_prompt} "
                          "(each sample is in one pair)")


def build_pairs(samples: list[Sample], scores: list[float], tokenizer, settings: DemoSettings) -> list[dict]:
    """Per prompt: rank its samples by oracle score and pair best with worst, 2nd best with 2nd worst...
    The response text keeps a generated EOS token literally, so training sees exactly the sampled tokens."""
    by_prompt: dict[str, list[tuple[float, Sample]]] = {}
    for s, score in zip(samples, scores):
        by_prompt.setdefault(s.prompt, []).append((score, s))
    pairs = []
    for prompt, scored in by_prompt.items():
        ranked = sorted(scored, key=lambda x: -x[0])
        for k in range(min(settings.pairs_per_prompt, len(ranked) // 2)):
            (hi, best), (lo, worst) = ranked[k], ranked[-1 - k]
            if hi - lo < settings.min_score_gap:
                continue
            text = [tokenizer.decode(x.completion_ids, skip_special_tokens=False) for x in (best, worst)]
            if text[0] == text[1]:
                continue
            pairs.append({"prompt": prompt, "chosen": text[0], "rejected": text[1],
                          "chosen_score": hi, "rejected_score": lo})
    return pairs
