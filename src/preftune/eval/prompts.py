"""Prompts for controlled sentiment generation: short openings of movie reviews.

As in the DPO paper (§6.1), a prompt is the first k words (k uniform in [min_words, max_words],
the paper's "2-8 token prefixes") of a real review; the policy continues it and the sentiment
oracle scores the full review. Every builder here is deterministic from its seed, returns distinct
prompts, and balances positive and negative sources: prompts alternate positive, negative,
positive, ... so any prefix of the list is balanced, and the list for n is a prefix of the list
for a larger n with the same seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from preftune.errors import DataError
from preftune.eval.scorers import rotten_tomatoes_snippets

_LEADING_JUNK = re.compile(r"^\W+")  # quotes, ellipses, dashes, brackets before the first word


def _clean(text: str) -> str:
    """Collapse whitespace, drop leading punctuation, capitalise the first letter."""
    text = _LEADING_JUNK.sub("", " ".join(text.split()))
    return text[:1].upper() + text[1:]


def _check_bounds(n: int, min_words: int, max_words: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")


def _balanced_openings(
    positive: Sequence[str], negative: Sequence[str], n: int, *, seed: int,
    min_words: int, max_words: int, source: str,
) -> list[str]:
    """n distinct openings alternating between the two pools. Texts shorter than max_words + 2
    words are skipped (an opening must leave the review unfinished)."""
    _check_bounds(n, min_words, max_words)
    rng = random.Random(seed)
    pools = []
    for texts in (positive, negative):
        cleaned = sorted({c for c in map(_clean, texts) if len(c.split()) >= max_words + 2})
        rng.shuffle(cleaned)
        pools.append(iter(cleaned))
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        side = len(prompts) % 2
        for text in pools[side]:
            prompt = " ".join(text.split()[: rng.randint(min_words, max_words)])
            if prompt.lower() not in seen:
                seen.add(prompt.lower())
                prompts.append(prompt)
                break
        else:
            label = "positive" if side == 0 else "negative"
            raise ValueError(
                f"{source}: ran out of {label} reviews after {len(prompts)} distinct balanced "
                f"prompts (asked for {n}); ask for fewer"
            )
    return prompts


def rotten_tomatoes_prompts(
    n: int, *, seed: int = 0, min_words: int = 2, max_words: int = 8
) -> list[str]:
    """Openings of Rotten Tomatoes snippets from the sentiment oracle's HELD-OUT part only, so
    the oracle never trained on a prompt's source; fresh and rotten alternate. About 1,200
    distinct prompts are available with the default bounds."""
    heldout = rotten_tomatoes_snippets("heldout")
    return _balanced_openings(
        [t for t, label in heldout if label == 1], [t for t, label in heldout if label == 0], n,
        seed=seed, min_words=min_words, max_words=max_words, source="rotten tomatoes (held-out)",
    )


def imdb_prompts(
    path: Path, n: int, *, seed: int = 0, min_words: int = 2, max_words: int = 8
) -> list[str]:
    """Openings of IMDb reviews (the paper's prompt source) read from ``path``, a JSONL file with
    ``label`` (1 positive, 0 negative) and ``text``; positive and negative alternate. The file is
    research data kept beside the project (``../shared/data/imdb/reviews.jsonl``), never inside
    it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"IMDb reviews not found at {path}: expected the JSONL file kept beside the project "
            "(shared/data/imdb/reviews.jsonl, see shared/data/README.md); pass its path"
        )
    texts: dict[int, list[str]] = {0: [], 1: []}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise DataError(str(path), line_no, None, f"not JSON ({getattr(err, 'msg', 'nested too deeply')})") \
                    from None
            if not isinstance(row, dict) or row.get("label") not in (0, 1) \
                    or not isinstance(row.get("text"), str):
                raise DataError(str(path), line_no, "label" if isinstance(row, dict) and isinstance(
                    row.get("text"), str) else "text", "needs 'label' 0 or 1 and a string 'text'")
            texts[row["label"]].append(row["text"])
    return _balanced_openings(
        texts[1], texts[0], n, seed=seed, min_words=min_words, max_words=max_words, source=str(path)
    )


def split_prompts(
    prompts: Sequence[str], heldout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train, heldout): a seeded random ``round(len * heldout_fraction)`` prompts are held out;
    both parts keep the input order (so alternating-label lists stay roughly balanced)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_heldout = round(len(prompts) * heldout_fraction)
    heldout_idx = set(random.Random(seed).sample(range(len(prompts)), n_heldout))
    train = [p for i, p in enumerate(prompts) if i not in heldout_idx]
    heldout = [p for i, p in enumerate(prompts) if i in heldout_idx]
    return train, heldout
