"""Records with several ranked or scored responses per prompt expand into all ordered preference pairs."""

from __future__ import annotations

import csv
import json

import pytest

from preftune.data.records import DataError, PreferencePair, read_preference_pairs, validate_preferences

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello, how can I help?"}
B = {"role": "assistant", "content": "Hello."}
C = {"role": "assistant", "content": "Go away."}
PAIR = {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _pairs(raw, **kw):
    return [(p.chosen, p.rejected) for p in validate_preferences(raw, "f.jsonl", 9, **kw)]


# ------------------------------------------------------------------ the three shapes


def test_responses_with_scores_give_every_ordered_pair_best_first(tmp_path):
    rec = {"prompt": "Name a fruit.", "responses": [" pear", " apple", " rock", " fig"], "scores": [2, 9, -1, 5.5]}
    path = _jsonl(tmp_path / "s.jsonl", [PAIR, rec])
    pairs, report = read_preference_pairs(path)
    # ranks: apple (9), fig (5.5), pear (2), rock (-1); by better's rank, then worse's rank
    assert pairs == [PreferencePair("What is 2+2?", " 4", " 5", f"{path}:1")] + [
        PreferencePair("Name a fruit.", better, worse, f"{path}:2") for better, worse in [
            (" apple", " fig"), (" apple", " pear"), (" apple", " rock"),
            (" fig", " pear"), (" fig", " rock"),
            (" pear", " rock")]]
    assert (report.skipped, report.total) == (0, 2)


def test_scored_objects_accept_text_content_or_response_keys():
    rec = {"prompt": "p", "responses": [{"text": "low", "score": 0.1}, {"content": "high", "score": 0.9},
                                        {"response": "mid", "score": 0.5, "model": "x"}]}
    assert _pairs(rec) == [("high", "mid"), ("high", "low"), ("mid", "low")]


def test_ranked_list_is_a_strict_ranking():
    rec = {"prompt": "p", "ranked": ["a", "b", "c", "d"]}
    assert _pairs(rec) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]


@pytest.mark.parametrize("n", [2, 3, 7])
def test_n_distinct_scores_give_n_choose_2_pairs_each_better_scored_higher(n):
    texts = [f"r{i}" for i in range(n)]
    scores = [(i * 5) % n for i in range(n)]  # a permutation of 0..n-1 (n and 5 coprime)
    pairs = _pairs({"prompt": "p", "responses": texts, "scores": scores})
    assert len(pairs) == n * (n - 1) // 2 == len(set(pairs))
    score = dict(zip(texts, scores, strict=True))
    assert all(score[better] > score[worse] for better, worse in pairs)


def test_ties_give_no_pair_and_tied_responses_keep_their_input_order():
    rec = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [1, 3, 1, 0]}
    assert _pairs(rec) == [("b", "a"), ("b", "c"), ("b", "d"), ("a", "d"), ("c", "d")]  # no (a, c)


def test_a_response_repeated_with_the_same_score_counts_once():
    rec = {"prompt": "p", "responses": ["a", "b", " a "], "scores": [2, 1, 2]}
    assert _pairs(rec) == [("a", "b")]


def test_a_pair_record_with_a_responses_field_stays_a_pair():
    rec = dict(PAIR, responses=["x", "y"], scores=[1, 2])
    assert _pairs(rec) == [(" 4", " 5")]


# ------------------------------------------------------------------ cap


def test_cap_keeps_the_largest_score_gaps_in_the_usual_order():
    rec = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [10, 7, 6, 0]}
    # gaps: a>b 3, a>c 4, a>d 10, b>c 1, b>d 7, c>d 6
    assert _pairs(rec, max_pairs_per_prompt=3) == [("a", "d"), ("b", "d"), ("c", "d")]
    assert _pairs(rec, max_pairs_per_prompt=1) == [("a", "d")]
    assert _pairs(rec, max_pairs_per_prompt=4) == [("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    full = _pairs(rec)
    assert _pairs(rec, max_pairs_per_prompt=6) == _pairs(rec, max_pairs_per_prompt=100) == full and len(full) == 6


def test_cap_on_a_ranking_uses_rank_differences_and_breaks_equal_gaps_by_order():
    rec = {"prompt": "p", "ranked": ["a", "b", "c", "d"]}
    # rank gaps: a>d 3; a>c and b>d 2 (a>c comes first); the rest 1
    assert _pairs(rec, max_pairs_per_prompt=2) == [("a", "c"), ("a", "d")]
    assert _pairs(rec, max_pairs_per_prompt=3) == [("a", "c"), ("a", "d"), ("b", "d")]
    assert _pairs(rec, max_pairs_per_prompt=4) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d")]


def test_cap_applies_per_record_and_leaves_pair_records_alone(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "ranked": ["a", "b", "c"]}, PAIR,
                                          {"prompt": "q", "ranked": ["x", "y", "z"]}])
    pairs, _ = read_preference_pairs(path, max_pairs_per_prompt=1)
    assert [(p.chosen, p.rejected, p.source) for p in pairs] == [
        ("a", "c", f"{path}:1"), (" 4", " 5", f"{path}:2"), ("x", "z", f"{path}:3")]


@pytest.mark.parametrize("cap", [0, -1, True, 1.5, "2"])
def test_cap_must_be_a_positive_integer(tmp_path, cap):
    path = _jsonl(tmp_path / "c.jsonl", [PAIR])
    with pytest.raises(ValueError, match="max_pairs_per_prompt must be a positive integer or None"):
        read_preference_pairs(path, max_pairs_per_prompt=cap)


# ------------------------------------------------------------------ bad records

OBJ = [{"text": "a", "score": 1}, {"text": "b", "score": 2}]
BAD = {
    "responses not a list": ({"prompt": "p", "responses": "a b", "scores": [1, 2]},
                             "field 'responses': expected a list of at least 2 responses, got str"),
    "one response": ({"prompt": "p", "responses": ["a"], "scores": [1]},
                     "field 'responses': needs at least 2 responses, got 1"),
    "scores missing": ({"prompt": "p", "responses": ["a", "b"]}, "field 'scores': missing field"),
    "scores not a list": ({"prompt": "p", "responses": ["a", "b"], "scores": 3},
                          "field 'scores': expected a list of numbers, got int"),
    "scores too short": ({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]},
                         "field 'scores': has 2 entries but 'responses' has 3"),
    "string score": ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]},
                     "field 'scores': score #2 must be a number, got str"),
    "null score": ({"prompt": "p", "responses": ["a", "b"], "scores": [None, 2]},
                   "field 'scores': score #1 must be a number, got null"),
    "bool score": ({"prompt": "p", "responses": ["a", "b"], "scores": [True, False]},
                   "field 'scores': score #1 must be a number, got bool"),
    "NaN score": ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}', "field 'scores': score #2 is NaN"),
    "infinite score": ('{"prompt": "p", "responses": ["a", "b"], "scores": [Infinity, 1]}',
                       "field 'scores': score #1 must be finite, got inf"),
    "empty response": ({"prompt": "p", "responses": ["a", " \n"], "scores": [1, 2]},
                       "field 'responses': response #2: empty"),
    "null response": ({"prompt": "p", "responses": [None, "b"], "scores": [1, 2]},
                      "field 'responses': response #1: expected a string or a list of {role, content} messages, "
                      "got null"),
    "duplicate, different scores": ({"prompt": "p", "responses": ["a", "b", "a "], "scores": [1, 2, 3]},
                                    "field 'responses': duplicate response with different scores (#1 and #3)"),
    "all tied": ({"prompt": "p", "responses": ["a", "b", "c"], "scores": [4, 4, 4]},
                 "field 'scores': all responses tied"),
    "object without score": ({"prompt": "p", "responses": [OBJ[0], {"text": "b"}]},
                             "field 'responses': response #2: missing 'score'"),
    "object string score": ({"prompt": "p", "responses": [OBJ[0], {"text": "b", "score": "high"}]},
                            "field 'responses': response #2: 'score' must be a number, got str"),
    "object NaN score": ('{"prompt": "p", "responses": [{"text": "a", "score": NaN}, {"text": "b", "score": 1}]}',
                         "field 'responses': response #1: 'score' is NaN"),
    "object without text": ({"prompt": "p", "responses": [OBJ[0], {"score": 3}]},
                            "field 'responses': response #2: needs exactly one of 'text', 'content', 'response'"),
    "object with two texts": ({"prompt": "p", "responses": [OBJ[0], {"text": "b", "content": "c", "score": 3}]},
                              "field 'responses': response #2: needs exactly one of 'text', 'content', 'response'; "
                              "it has 'text', 'content'"),
    "object empty text": ({"prompt": "p", "responses": [OBJ[0], {"content": "", "score": 3}]},
                          "field 'responses': response #2: empty"),
    "object then string": ({"prompt": "p", "responses": [OBJ[0], "b"]},
                           "field 'responses': response #2: expected an object with a response and a 'score' "
                           "(like response #1), got str"),
    "objects and scores": ({"prompt": "p", "responses": OBJ, "scores": [1, 2]},
                           "field 'scores': given, but 'responses' are objects that carry their own 'score'"),
    "objects duplicate": ({"prompt": "p", "responses": OBJ + [{"response": "a", "score": 5}]},
                          "field 'responses': duplicate response with different scores (#1 and #3)"),
    "objects all tied": ({"prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 1.0}]},
                         "field 'responses': all responses tied"),
    "ranked not a list": ({"prompt": "p", "ranked": {"a": 1}},
                          "field 'ranked': expected a list of at least 2 responses, got dict"),
    "ranked one": ({"prompt": "p", "ranked": ["a"]}, "field 'ranked': needs at least 2 responses, got 1"),
    "ranked empty entry": ({"prompt": "p", "ranked": ["a", ""]}, "field 'ranked': response #2: empty"),
    "ranked duplicate": ({"prompt": "p", "ranked": ["a", "b", "a"]},
                         "field 'ranked': duplicate response with different ranks (#1 and #3)"),
    "ranked and responses": ({"prompt": "p", "ranked": ["a", "b"], "responses": ["a", "b"], "scores": [1, 2]},
                             "field 'ranked': given together with 'responses'; a record uses one of them"),
    "missing prompt": ({"responses": ["a", "b"], "scores": [1, 2]}, "field 'prompt': missing field"),
    "conversation for a string prompt": ({"prompt": "p", "responses": ["a", [A]], "scores": [1, 2]},
                                         "field 'responses': response #2: is a list of messages but 'prompt' is "
                                         "a string"),
    "string for a conversation": ({"prompt": [U], "ranked": [[A], "b"]},
                                  "field 'ranked': response #2: is a string but 'prompt' is a list of messages"),
    "bad message": ({"prompt": [U], "responses": [[A], [{"role": "bot", "content": "x"}]], "scores": [1, 2]},
                    "field 'responses': response #2: message #1: role 'bot' is not one of system, user, assistant, "
                    "tool"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_multi_response_record_names_file_line_and_field(tmp_path, case):
    bad, expected = BAD[case]
    path = _jsonl(tmp_path / "bad.jsonl", [PAIR, {"prompt": "p", "ranked": ["x", "y"]}, bad])
    with pytest.raises(DataError) as err:
        read_preference_pairs(path)
    assert str(err.value) == f"{path}:3: {expected} (on_invalid=skip would skip this record and count it)"
    assert (err.value.file, err.value.line) == (str(path), 3)
    pairs, report = read_preference_pairs(path, on_invalid="skip")
    assert (len(pairs), report.skipped, report.total) == (2, 1, 3)


# ------------------------------------------------------------------ conversations


def test_conversational_responses_in_all_three_shapes():
    sys_msg = {"role": "system", "content": "Be kind."}
    prompt = [sys_msg, U]
    expected = [([A], [B]), ([A], [C]), ([B], [C])]
    assert _pairs({"prompt": prompt, "responses": [[C], [A], [B]], "scores": [0, 2, 1]}) == expected
    objects = [{"content": [B], "score": 1}, {"content": [dict(A, name="bot")], "score": 2}, {"text": [C], "score": 0}]
    assert _pairs({"prompt": prompt, "responses": objects}) == expected  # extra message keys dropped
    assert _pairs({"prompt": prompt, "ranked": [[A], [B], [C]]}) == expected
    (pair,) = validate_preferences({"prompt": prompt, "ranked": [[A], [B]]}, "f", 2)
    assert pair == PreferencePair(prompt, [A], [B], "f:2")


# ------------------------------------------------------------------ file formats

SHAPES = {
    "scores": {"prompt": "p", "responses": ["b", "a", "c"], "scores": [0.5, 0.9, 0.1]},
    "objects": {"prompt": "p", "responses": [{"text": "b", "score": 0.5}, {"text": "a", "score": 0.9},
                                             {"text": "c", "score": 0.1}]},
    "ranked": {"prompt": "p", "ranked": ["a", "b", "c"]},
}


def _write_jsonl(path, rows):
    return _jsonl(path.with_suffix(".jsonl"), rows)


def _write_json(path, rows):
    path = path.with_suffix(".json")
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = path.with_suffix(".parquet")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist keeps the first row's only
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]), path)
    return path


def _write_csv(path, rows):  # list cells as JSON; a cell a row lacks is written empty, as CSV tools do
    path = path.with_suffix(".csv")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json.dumps(row[k]) if isinstance(row.get(k), list) else row.get(k, "") for k in columns])
    return path


@pytest.mark.parametrize("write", [_write_jsonl, _write_json, _write_parquet, _write_csv], ids=lambda f: f.__name__[7:])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_reads_the_same_from_every_format(tmp_path, shape, write):
    path = write(tmp_path / "d", [PAIR, SHAPES[shape]])
    pairs, report = read_preference_pairs(path)
    expected = [(" 4", " 5")] + [("a", "b"), ("a", "c"), ("b", "c")]
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    first = 2 if write is _write_csv else 1  # CSV lines are physical: the header is line 1
    assert [p.source for p in pairs] == [f"{path}:{first}"] + [f"{path}:{first + 1}"] * 3
    assert (report.skipped, report.total) == (0, 2)


def test_parquet_conversational_scored_objects_with_different_text_keys(tmp_path):
    rec = {"prompt": [U], "responses": [{"content": [B], "score": 1.0}, {"text": [A], "score": 3.0},
                                        {"response": [C], "score": -2.0}]}
    path = _write_parquet(tmp_path / "conv", [rec])  # one struct type: each row has the other keys as null
    pairs, _ = read_preference_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [([U], [A], [B]), ([U], [A], [C]), ([U], [B], [C])]


# ------------------------------------------------------------------ skip mode and limit


def _mixed_file(tmp_path):
    return _jsonl(tmp_path / "mixed.jsonl", [
        PAIR,
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 2, 1]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [7, 7]},
        '{"prompt": "p", "responses": ["a", "b"], "scores": [NaN, 1]}',
        {"prompt": "p", "responses": [{"text": "a", "score": 2}, {"text": "b", "score": 2}]},
        {"prompt": "q", "ranked": ["x", "y"]},
    ])


def test_skip_mode_counts_tied_and_bad_multi_response_records(tmp_path):
    path = _mixed_file(tmp_path)
    pairs, report = read_preference_pairs(path, on_invalid="skip")
    assert [(p.chosen, p.rejected, p.source) for p in pairs] == [
        (" 4", " 5", f"{path}:1"), ("a", "b", f"{path}:2"), ("a", "c", f"{path}:2"), ("b", "c", f"{path}:2"),
        ("x", "y", f"{path}:6")]
    assert (report.skipped, report.total) == (3, 6)
    assert report.reasons == {"all responses tied": 2, "field 'scores': score is NaN": 1}
    assert report.examples == [f"{path}:3: field 'scores': all responses tied",
                               f"{path}:4: field 'scores': score #1 is NaN",
                               f"{path}:5: field 'responses': all responses tied"]
    with pytest.raises(DataError, match=r"mixed\.jsonl:3: field 'scores': all responses tied"):
        read_preference_pairs(path)


def test_limit_counts_pairs_not_records(tmp_path):
    path = _mixed_file(tmp_path)
    pairs, report = read_preference_pairs(path, limit=3)
    assert [(p.chosen, p.rejected) for p in pairs] == [(" 4", " 5"), ("a", "b"), ("a", "c")]
    assert report.total == 2
    pairs, report = read_preference_pairs(path, on_invalid="skip", limit=5)
    assert len(pairs) == 5 and pairs[-1].source == f"{path}:6" and (report.skipped, report.total) == (3, 6)
    pairs, _ = read_preference_pairs(path, on_invalid="skip", limit=3, max_pairs_per_prompt=1)
    assert [(p.chosen, p.rejected) for p in pairs] == [(" 4", " 5"), ("a", "c"), ("x", "y")]
