"""The statistics of judged comparisons: win rates with ties and failures and their intervals, a judge's agreement
with human labels (accuracy, Cohen's kappa), its position bias (swap consistency, first-slot rate), its length bias,
and the length-controlled win rate. Pure functions over floats, each pinned by a hand-computed test.

Conventions. A *judgment* of "is x better than y" is P in [0, 1], or None when the judge failed (an unparsable
verdict, a refused call): failures are counted and reported, never turned into a coin flip. Each comparison is
judged in both orders and the two are combined by :func:`swap_average`. A combined P above 1/2 is a win, below a
loss, exactly 1/2 a tie (text mode: the two orders disagreed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def swap_average(p_first: float | None, p_second: float | None, mode: str = "logprobs") -> float | None:
    """One comparison's P(x better than y) from both orders: ``p_first`` = P(x better) with x shown first (slot A),
    ``p_second`` = P(x better) with x shown second. ``logprobs``: their mean. ``text`` (each P is 0 or 1): agreeing
    orders keep their verdict, disagreeing ones are a tie (1/2). None when either order failed."""
    if p_first is None or p_second is None:
        return None
    if mode == "text":
        return p_first if p_first == p_second else 0.5
    return (p_first + p_second) / 2


@dataclass
class WinRate:
    n: int  # comparisons judged (failures included)
    wins: int
    ties: int
    fails: int
    win_rate: float  # (wins + ties / 2) / (n - fails); nan when nothing was judged
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return dict(vars(self))


def verdict(p: float | None, x: str = "x", y: str = "y") -> str:
    """A combined P(x better than y) as a word: ``x``'s name, ``y``'s, "tie" or "fail"."""
    return "fail" if p is None else x if p > 0.5 else y if p < 0.5 else "tie"


def summarise(probs: list[float | None], lengths_x: list[int], lengths_y: list[int]) -> dict:
    """x's win rate over y with its interval, the length-controlled win rate, both mean lengths (in words) and how
    many of x's responses are empty (a judge that prefers an empty reply rewards them for that alone)."""
    n = max(1, len(lengths_x))
    return {**win_rate(probs).as_dict(), "length_controlled_win_rate": length_controlled_win_rate(probs, lengths_x,
                                                                                                 lengths_y),
            "mean_length": sum(lengths_x) / n, "mean_length_opponent": sum(lengths_y) / n,
            "empty": sum(length == 0 for length in lengths_x)}


def empty_reply_preference(p_chosen_over_empty: list[float | None]) -> dict:
    """How often a judge prefers an EMPTY reply to the human-chosen one (a tie counts 1/2; failures left out),
    from its swap-averaged P(chosen better than empty) on labelled pairs, with the 95% interval. Above 1/2 the
    judge rewards saying nothing: a policy that learns to stop at once wins against it without being better."""
    rate = win_rate([None if p is None else 1.0 - p for p in p_chosen_over_empty])
    return {"prefers_empty_reply": rate.win_rate, "prefers_empty_reply_ci95": [rate.ci_low, rate.ci_high]}


def with_empty_probe(card: dict, probe: dict) -> dict:
    """The judge card with the empty-reply probe: ``informative`` also requires that the judge does not prefer an
    empty reply to the human-chosen one more often than not; ``uninformative_because`` says why it is not."""
    reasons = [] if card["informative"] else ["does not beat always-longer"]
    if probe["prefers_empty_reply"] > 0.5:
        reasons.append(f"prefers an empty reply to the human-chosen one on {probe['prefers_empty_reply']:.0%} of "
                       f"the pairs")
    return {**card, **probe, "informative": not reasons, "uninformative_because": "; ".join(reasons) or None}


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (a tie counts 1/2 a success)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(probs: list[float | None]) -> WinRate:
    """The win rate of x over y from each comparison's combined P (None: failed)."""
    judged = [p for p in probs if p is not None]
    wins = sum(p > 0.5 for p in judged)
    ties = sum(p == 0.5 for p in judged)
    score = wins + ties / 2
    low, high = wilson_interval(score, len(judged))
    return WinRate(n=len(probs), wins=wins, ties=ties, fails=len(probs) - len(judged),
                   win_rate=score / len(judged) if judged else math.nan, ci_low=low, ci_high=high)


def cohens_kappa(judge: list[bool], human: list[bool]) -> float:
    """Cohen's kappa between two binary raters (True: the first response is preferred)."""
    n = len(judge)
    assert n == len(human) and n > 0
    observed = sum(a == b for a, b in zip(judge, human)) / n
    pj, ph = sum(judge) / n, sum(human) / n
    expected = pj * ph + (1 - pj) * (1 - ph)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def logistic_fit(x: list[float], y: list[float], iterations: int = 50, l2: float = 1e-6) -> tuple[float, float]:
    """(intercept, slope) of a logistic model P(y=1) = sigmoid(a + b x) by Newton's method; ``y`` may hold 1/2
    (a tie counts as half a win and half a loss); a tiny ridge on the slope keeps separable data finite."""
    a = b = 0.0
    for _ in range(iterations):
        ga = gb = haa = hab = hbb = 0.0
        for xi, yi in zip(x, y):
            p = 1 / (1 + math.exp(-(a + b * xi)))
            w = p * (1 - p)
            ga += yi - p
            gb += (yi - p) * xi
            haa += w
            hab += w * xi
            hbb += w * xi * xi
        gb -= l2 * b
        hbb += l2
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) < 1e-12 and abs(db) < 1e-12:
            break
    return a, b


def length_controlled_win_rate(probs: list[float | None], lengths_x: list[int], lengths_y: list[int]) -> float:
    """The win rate a logistic model of the outcome on the length difference predicts at equal lengths (as
    AlpacaEval's length-controlled win rate does): sigmoid(intercept), the length term set to zero. Length
    differences are in units of their standard deviation; failures are left out."""
    rows = [(p, lx - ly) for p, lx, ly in zip(probs, lengths_x, lengths_y) if p is not None]
    if not rows:
        return math.nan
    outcomes = [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5 for p, _ in rows]
    diffs = [d for _, d in rows]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs)) or 1.0
    a, _ = logistic_fit([d / sd for d in diffs], outcomes)
    return 1 / (1 + math.exp(-a))


def _side(p: float) -> int:
    """+1: prefers the first-named response, -1: the other, 0: a tie."""
    return 1 if p > 0.5 else -1 if p < 0.5 else 0


def swap_consistency(p_first: list[float | None], p_second: list[float | None]) -> float:
    """The fraction of comparisons (both orders judged) whose two orders prefer the same response."""
    both = [(a, b) for a, b in zip(p_first, p_second) if a is not None and b is not None]
    return sum(_side(a) == _side(b) != 0 for a, b in both) / len(both) if both else math.nan


def first_slot_rate(p_first: list[float | None], p_second: list[float | None]) -> float:
    """How often a single-order judgment prefers whatever sits in slot A (1/2 for a judge without position bias).
    ``p_first``: P(x better) with x in slot A; ``p_second``: P(x better) with x in slot B."""
    picks = [_side(p) for p in p_first if p is not None] + [-_side(p) for p in p_second if p is not None]
    decided = [s for s in picks if s != 0]
    return sum(s > 0 for s in decided) / len(decided) if decided else math.nan


def judge_card(p_first: list[float | None], p_second: list[float | None], lengths_chosen: list[int],
               lengths_rejected: list[int], mode: str = "logprobs", seed: int = 0) -> dict:
    """A judge's reliability on human-labelled pairs (x = the chosen response, y = the rejected one, each judged in
    both orders): accuracy against the label with its 95% interval, Cohen's kappa (each pair shown in a seeded
    random orientation, so that the labels are not all one class), swap consistency, first-slot rate, how often it
    prefers the longer response, and two baselines on the same pairs: always-longer and random. ``informative``:
    the judge's accuracy beats always-longer's (a judge that does not is reporting length, not quality)."""
    import random

    combined = [swap_average(a, b, mode) for a, b in zip(p_first, p_second)]
    accuracy = win_rate(combined)
    rng = random.Random(seed)
    flips = [rng.random() < 0.5 for _ in combined]
    rated = [(p, flip) for p, flip in zip(combined, flips) if p is not None and p != 0.5]
    kappa = cohens_kappa([(p > 0.5) != flip for p, flip in rated], [not flip for _, flip in rated]) if rated else math.nan
    differ = [(p, lc > lr) for p, lc, lr in zip(combined, lengths_chosen, lengths_rejected) if p is not None and lc != lr]
    longer = [1.0 if chosen_longer else 0.0 for _, chosen_longer in differ]
    always_longer = win_rate([1.0 if lc > lr else 0.0 if lc < lr else 0.5
                              for lc, lr in zip(lengths_chosen, lengths_rejected)])
    random_draw = win_rate([float(rng.random() < 0.5) for _ in combined])
    return {
        "pairs": len(combined), "mode": mode,
        "accuracy": accuracy.win_rate, "accuracy_ci95": [accuracy.ci_low, accuracy.ci_high],
        "ties": accuracy.ties, "fails": accuracy.fails,
        "kappa": kappa,
        "swap_consistency": swap_consistency(p_first, p_second),
        "first_slot_rate": first_slot_rate(p_first, p_second),
        "prefers_longer": (sum((p > 0.5) == bool(c) and p != 0.5 for p, c in zip([p for p, _ in differ], longer))
                           / len(differ)) if differ else math.nan,
        "baseline_always_longer": always_longer.win_rate,
        "baseline_always_longer_ci95": [always_longer.ci_low, always_longer.ci_high],
        "baseline_random": 0.5, "baseline_random_draw": random_draw.win_rate,
        "informative": bool(accuracy.win_rate > max(always_longer.win_rate, 0.5)),
    }
