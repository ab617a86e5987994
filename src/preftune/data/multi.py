"""Records with several responses per prompt, expanded into all ordered preference pairs.

Three shapes are accepted (each with a ``prompt``, which must be given explicitly):

1. ``{"responses": [r1, r2, ...], "scores": [s1, s2, ...]}``: a higher score is better;
2. ``{"responses": [{"text"|"content"|"response": r, "score": s}, ...]}``: scored objects;
3. ``{"ranked": [best, second, ..., worst]}``: a strict ranking (its "score" is the negated rank).

Like the DPO reference implementation does for Stanford SHP, a record gives every ordered pair
(better, worse): n·(n−1)/2 pairs for n distinct scores. Equal scores give no pair, since a tie
carries no preference. Pairs are ordered by the better response's rank, then the worse one's
(responses sorted by descending score, tied ones kept in their input order).

A response repeated with the same score is kept once (it would only duplicate pairs); repeated
with a different score it contradicts itself and the record is rejected. Responses are compared as
``chosen`` and ``rejected`` are (surrounding whitespace ignored).

``max_pairs_per_prompt`` caps the pairs of one record. It keeps the pairs with the largest score
gap (rank difference for ``ranked``), the most informative ones, breaking equal gaps by the order
above; the pairs it keeps stay in that order, so a capped list is a subsequence of the full one.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from preftune.data.schema import TYPE_ERROR, Invalid, Text, check_same_kind, check_text, normalised
from preftune.errors import default_reason

MULTI_FIELDS = ("responses", "ranked")
TEXT_KEYS = ("text", "content", "response")  # where a scored object keeps its response


@dataclass(frozen=True)
class _Scored:
    text: Text
    score: float
    position: int  # 1-based place in the record's list, for error messages


def _given(value: Any) -> bool:
    """CSV writes an absent cell as "": that must not turn a pair row into a multi-response row."""
    return value is not None and not (isinstance(value, str) and value == "")


def is_multi_response(raw: dict) -> bool:
    """``responses`` or ``ranked`` without ``chosen``/``rejected``.

    A record with ``chosen``/``rejected`` stays a pair record (any other field is ignored, as
    before), so pair datasets that also carry a ``responses`` column read exactly as they did.
    """
    return (any(_given(raw.get(name)) for name in MULTI_FIELDS)
            and not any(_given(raw.get(name)) for name in ("chosen", "rejected")))


# ---------------------------------------------------------------- one field at a time


def _response(value: Any, name: str, position: int, prompt: Text) -> Text:
    """One response checked like ``chosen``; errors say which entry of ``name`` is bad."""
    try:
        if value is None:
            raise Invalid(name, TYPE_ERROR + "null", f"field '{name}': null response")
        text = check_text(value, name, is_response=True)
        check_same_kind({"prompt": prompt, name: text})
    except Invalid as bad:
        raise Invalid(name, f"response #{position}: {bad.message}",
                       bad.reason or default_reason(name, bad.message)) from None
    return text


def _score(value: Any, name: str, what: str) -> float:
    """A finite real number (not a bool); ``what`` names it in the message, e.g. "score #2"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        got = "null" if value is None else type(value).__name__
        raise Invalid(name, f"{what} must be a number, got {got}", f"field '{name}': score is not a number")
    try:
        infinite = math.isinf(value)
    except OverflowError:  # an integer beyond a float's range (a JSON number may have any number of digits)
        infinite, value = True, math.inf if value > 0 else -math.inf
    if math.isnan(value):
        raise Invalid(name, f"{what} is NaN", f"field '{name}': score is NaN")
    if infinite:  # an infinite reward is a bug upstream, and it makes every gap infinite
        raise Invalid(name, f"{what} must be finite, got {value}", f"field '{name}': score is infinite")
    return value


def _list(raw: dict, name: str) -> list:
    """The record's list of at least two responses under ``name``."""
    value = raw.get(name)
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        raise Invalid(name, f"expected a list of at least 2 responses, got {got}",
                       f"field '{name}': not a list")
    if len(value) < 2:
        raise Invalid(name, f"needs at least 2 responses, got {len(value)}", f"field '{name}': fewer than 2 responses")
    return value


# ---------------------------------------------------------------- the three shapes


def _ranked(raw: dict, prompt: Text) -> list[_Scored]:
    if _given(raw.get("responses")):
        raise Invalid("ranked", "given together with 'responses'; a record uses one of them")
    ranked = _list(raw, "ranked")
    return [_Scored(_response(value, "ranked", i, prompt), -i, i) for i, value in enumerate(ranked, 1)]


def _with_scores(responses: list, raw: dict, prompt: Text) -> list[_Scored]:
    if not isinstance(raw.get("scores"), list):
        if raw.get("scores") is None:
            raise Invalid("scores", "missing field")
        raise Invalid("scores", f"expected a list of numbers, got {type(raw['scores']).__name__}")
    scores = raw["scores"]
    if len(scores) != len(responses):
        raise Invalid("scores", f"has {len(scores)} entries but 'responses' has {len(responses)}",
                       "field 'scores': length differs from 'responses'")
    return [_Scored(_response(value, "responses", i, prompt), _score(score, "scores", f"score #{i}"), i)
            for i, (value, score) in enumerate(zip(responses, scores, strict=True), 1)]


def _scored_object(obj: Any, position: int, prompt: Text) -> _Scored:
    where = f"response #{position}"
    if not isinstance(obj, dict):
        raise Invalid("responses", f"{where}: expected an object with a response and a 'score' (like response #1), "
                       f"got {type(obj).__name__}", "field 'responses': mixed objects and plain responses")
    keys = [key for key in TEXT_KEYS if obj.get(key) is not None]  # Parquet structs fill absent keys with None
    if len(keys) != 1:
        found = f"; it has {', '.join(map(repr, keys))}" if keys else ""
        raise Invalid("responses", f"{where}: needs exactly one of 'text', 'content', 'response'{found}",
                       "field 'responses': object without exactly one response key")
    if obj.get("score") is None:
        raise Invalid("responses", f"{where}: missing 'score'", "field 'responses': missing 'score'")
    return _Scored(_response(obj[keys[0]], "responses", position, prompt),
                   _score(obj["score"], "responses", f"{where}: 'score'"), position)


def _responses(raw: dict, prompt: Text) -> list[_Scored]:
    responses = _list(raw, "responses")
    if not isinstance(responses[0], dict):
        return _with_scores(responses, raw, prompt)
    if _given(raw.get("scores")):
        raise Invalid("scores", "given, but 'responses' are objects that carry their own 'score'")
    return [_scored_object(obj, i, prompt) for i, obj in enumerate(responses, 1)]


# ---------------------------------------------------------------- pairs


def _deduplicated(responses: list[_Scored], name: str, kind: str) -> list[_Scored]:
    first_seen: dict[Any, _Scored] = {}
    for response in responses:
        key = normalised(response.text)
        first = first_seen.setdefault(key if isinstance(key, str) else tuple(key), response)
        if first.score != response.score:
            where = f"(#{first.position} and #{response.position})"
            raise Invalid(name, f"duplicate response with different {kind} {where}",
                           f"field '{name}': duplicate response with different {kind}")
    return list(first_seen.values())


def _ordered_pairs(responses: list[_Scored]) -> list[tuple[_Scored, _Scored]]:
    """Every (better, worse) with a strictly higher score, by better's rank, then worse's rank."""
    ranked = sorted(responses, key=lambda r: r.score, reverse=True)  # stable: ties keep input order
    return [(better, worse) for i, better in enumerate(ranked) for worse in ranked[i + 1:]
            if better.score > worse.score]


def _capped(pairs: list[tuple[_Scored, _Scored]], max_pairs: int | None) -> list[tuple[_Scored, _Scored]]:
    """The ``max_pairs`` largest gaps (equal gaps: earlier pairs first), kept in their order."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    by_gap = sorted(range(len(pairs)), key=lambda k: pairs[k][0].score - pairs[k][1].score, reverse=True)
    keep = set(by_gap[:max_pairs])
    return [pair for k, pair in enumerate(pairs) if k in keep]


def multi_response_pairs(raw: dict, max_pairs: int | None = None) -> list[tuple[Text, Text, Text]]:
    """``(prompt, better, worse)`` for every ordered pair of one multi-response record.

    Raises ``Invalid`` (field + message) for a malformed record, including one whose responses
    are all tied: it would give no pair, which is almost always a broken score column.
    """
    prompt = check_text(raw.get("prompt"), "prompt", is_response=False)
    if _given(raw.get("ranked")):
        responses = _deduplicated(_ranked(raw, prompt), "ranked", "ranks")
    else:
        responses = _deduplicated(_responses(raw, prompt), "responses", "scores")
    pairs = _ordered_pairs(responses)
    if not pairs:
        tie_field = "scores" if _given(raw.get("scores")) else "responses"
        raise Invalid(tie_field, "all responses tied", "all responses tied")
    return [(prompt, better.text, worse.text) for better, worse in _capped(pairs, max_pairs)]
