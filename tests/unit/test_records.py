"""Readers and validation of preftune.data.records: every format, every promised error text."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.data.records import (
    DataError,
    PreferencePair,
    SkipReport,
    read_jsonl,
    read_preference_pairs,
    read_sft_examples,
    validate_pair,
    write_jsonl,
)
from preftune.paths import shared_data_dir

RECORDS = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "id": 1},
    {"prompt": "Write a haiku\nabout rain.", "chosen": "Rain falls softly", "rejected": "No.", "id": 2},
    {"prompt": "Say hi in French, é ü 中", "chosen": "Bonjour", "rejected": "Hello", "id": 3},
]
U = {"role": "user", "content": "Hi"}
A1 = {"role": "assistant", "content": "Hello!"}
A2 = {"role": "assistant", "content": "Go away."}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path, records):
    return _write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


# ------------------------------------------------------------------ formats

def _fmt_jsonl(tmp_path):  # a blank line before the third record: it is ignored, lines stay physical
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    return _write_lines(tmp_path / "d.jsonl", lines[:2] + ["   "] + lines[2:]), [1, 2, 4]


def _fmt_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    return path, [1, 2, 3]


def _fmt_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    return path, [1, 2, 3]


def _fmt_json_data(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": RECORDS, "version": 1}), encoding="utf-8")
    return path, [1, 2, 3]


def _fmt_csv(tmp_path):  # record 2 has a two-line cell, so record 3 starts on physical line 5
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(RECORDS)
    return path, [2, 3, 5]


def _fmt_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path, [1, 2, 3]


def _fmt_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds", [1, 2, 3]


def _fmt_dataset_dict(tmp_path):
    import datasets

    other = datasets.Dataset.from_list(RECORDS[:1])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS), "test": other}).save_to_disk(
        str(tmp_path / "dsd"))
    return tmp_path / "dsd", [1, 2, 3]


FORMATS = [_fmt_jsonl, _fmt_jsonl_gz, _fmt_json_list, _fmt_json_data, _fmt_csv, _fmt_parquet,
           _fmt_dataset, _fmt_dataset_dict]


@pytest.mark.parametrize("make", FORMATS, ids=lambda f: f.__name__[5:])
def test_every_format_reads_the_same_records_with_sources(tmp_path, make):
    path, lines = make(tmp_path)
    pairs, report = read_preference_pairs(path)
    expected = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"{path}:{n}")
                for r, n in zip(RECORDS, lines, strict=True)]
    assert pairs == expected
    assert (report.skipped, report.total) == (0, 3)


def test_dataset_dict_split_is_chosen_with_double_colon(tmp_path):
    path, _ = _fmt_dataset_dict(tmp_path)
    pairs, _ = read_preference_pairs(f"{path}::test")
    assert [p.chosen for p in pairs] == [" 4"]
    assert pairs[0].source == f"{path}::test:1"
    with pytest.raises(DataError, match="no split 'dev'; splits: train, test"):
        read_preference_pairs(f"{path}::dev")


def test_conversational_records_survive_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rec = {"prompt": [U], "chosen": [A1], "rejected": [A2]}
    csv_path = tmp_path / "c.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(rec), [json.dumps(v) for v in rec.values()],
                                 ["[not json] prompt", "[yes]", "no"]])
    pq_path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([rec]), pq_path)
    csv_pairs, _ = read_preference_pairs(csv_path)
    pq_pairs, _ = read_preference_pairs(pq_path)
    assert (csv_pairs[0].prompt, csv_pairs[0].chosen, csv_pairs[0].rejected) == ([U], [A1], [A2])
    assert (pq_pairs[0].prompt, pq_pairs[0].chosen, pq_pairs[0].rejected) == ([U], [A1], [A2])
    # a cell starting with "[" that is not a JSON list stays text; a JSON list cell is a conversation
    assert csv_pairs[1].prompt == "[not json] prompt"
    assert len(csv_pairs) == 2 and csv_pairs[1].source == f"{csv_path}:3"


def test_csv_empty_cell_is_an_empty_field_on_its_physical_line(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\np,,b\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_preference_pairs(path)
    # the error says what would have happened under on_invalid=skip
    assert str(err.value) == f"{path}:4: field 'chosen': empty (on_invalid=skip would skip this record and count it)"


def test_extra_message_keys_are_dropped_and_extra_record_keys_ignored(tmp_path):
    rec = {"prompt": [dict(U, name="bob")], "chosen": [A1], "rejected": [A2], "score": 0.3}
    pair = validate_pair(rec, "f.jsonl", 7)
    assert pair == PreferencePair([U], [A1], [A2], "f.jsonl:7")


# ------------------------------------------------------------------ bad records

GOOD = json.dumps(RECORDS[0])
BAD = {
    "invalid json": ('{"prompt": "p", "chosen": ', ":3: invalid JSON: Expecting value"),
    "missing field": ({"prompt": "p", "rejected": "r"}, ":3: field 'chosen': missing field"),
    "null is missing": ({"prompt": "p", "chosen": "c", "rejected": None}, ":3: field 'rejected': missing field"),
    "empty string": ({"prompt": "p", "chosen": " \n ", "rejected": "r"}, ":3: field 'chosen': empty"),
    "empty list": ({"prompt": [], "chosen": [A1], "rejected": [A2]}, ":3: field 'prompt': empty"),
    "wrong type": ({"prompt": "p", "chosen": 5, "rejected": "r"},
                   ":3: field 'chosen': expected a string or a list of {role, content} messages, got int"),
    "missing role": ({"prompt": [U], "chosen": [{"content": "x"}], "rejected": [A2]},
                     ":3: field 'chosen': message #1: missing 'role'"),
    "bad role": ({"prompt": [U, {"role": "bot", "content": "x"}], "chosen": [A1], "rejected": [A2]},
                 ":3: field 'prompt': message #2: role 'bot' is not one of system, user, assistant, tool"),
    "non-string content": ({"prompt": [U], "chosen": [A1], "rejected": [{"role": "assistant", "content": 3}]},
                           ":3: field 'rejected': message #1: 'content' must be a string"),
    "empty last content": ({"prompt": [U], "chosen": [A1, {"role": "assistant", "content": " "}],
                            "rejected": [A2]}, ":3: field 'chosen': last message has empty content"),
    "identical strings": ({"prompt": "p", "chosen": " same ", "rejected": "same"},
                          ":3: field 'chosen': chosen identical to rejected"),
    "identical lists": ({"prompt": [U], "chosen": [A1], "rejected": [A1]},
                        ":3: field 'chosen': chosen identical to rejected"),
    "mixed kinds": ({"prompt": "p", "chosen": [A1], "rejected": "r"},
                    ":3: field 'chosen': is a list of messages but 'prompt' is a string"),
    "mixed kinds rejected": ({"prompt": [U], "chosen": [A1], "rejected": "r"},
                             ":3: field 'rejected': is a string but 'prompt' is a list of messages"),
    "not an object": ([1, 2], ":3: expected a JSON object, got list"),
    "hh prompts differ": ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
                          ":3: field 'rejected': prompt differs from chosen's"),
    "no prompt to derive": ({"chosen": "plain", "rejected": "text"}, ":3: field 'prompt': missing field"),
    "string prompt, other conversations": ({"prompt": "Something else?", "chosen": [U, A1], "rejected": [U, A2]},
                                           ":3: field 'prompt': is a string, and 'chosen'/'rejected' are whole "
                                           "conversations whose shared messages do not end with a user turn"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_names_file_line_and_field(tmp_path, case):
    bad, expected = BAD[case]
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, bad if isinstance(bad, str) else json.dumps(bad)])
    with pytest.raises(DataError) as err:
        read_preference_pairs(path)
    assert str(err.value).startswith(f"{path}{expected}")
    assert (err.value.file, err.value.line) == (str(path), 3)


def test_error_attributes_and_text_without_field_or_line():
    err = DataError("x.jsonl", 3, "chosen", "empty")
    assert (err.file, err.line, err.field, err.message) == ("x.jsonl", 3, "chosen", "empty")
    assert str(err) == "x.jsonl:3: field 'chosen': empty"
    assert str(DataError("x.jsonl", None, None, "file not found")) == "x.jsonl: file not found"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.reason) == (str(err), err.reason)


def test_whole_file_problems(tmp_path):
    with pytest.raises(DataError) as err:
        read_preference_pairs(tmp_path / "nope.jsonl")
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: file not found"
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported format '\.txt'; supported: \.jsonl, \.jsonl\.gz, \.json"):
        read_preference_pairs(tmp_path / "d.txt")
    (tmp_path / "d.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r'expected a top-level list of records or \{"data"'):
        read_preference_pairs(tmp_path / "d.json")
    (tmp_path / "b.json").write_text('[\n{"prompt": 1},\n{oops}\n]')
    with pytest.raises(DataError, match=r"b\.json:3: invalid JSON"):
        read_preference_pairs(tmp_path / "b.json")
    with pytest.raises(ValueError, match="on_invalid must be 'error' or 'skip'"):
        read_preference_pairs(tmp_path / "d.json", on_invalid="warn")


# ------------------------------------------------------------------ skip mode and limit

def _mixed_file(tmp_path):
    no_chosen = json.dumps({"prompt": "p", "rejected": "r"})
    same = json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"})
    lines = [GOOD, no_chosen, GOOD, "{broken", same, no_chosen, GOOD]
    return _write_lines(tmp_path / "mixed.jsonl", lines)


def test_skip_mode_skips_exactly_the_bad_rows_and_reports_them(tmp_path):
    path = _mixed_file(tmp_path)
    pairs, report = read_preference_pairs(path, on_invalid="skip")
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3", f"{path}:7"]
    assert (report.skipped, report.total) == (4, 7)
    assert report.reasons == {"missing field 'chosen'": 2, "invalid JSON": 1, "chosen identical to rejected": 1}
    assert report.summary() == ("skipped 4 of 7 records: 2 × missing field 'chosen', 1 × invalid JSON, "
                                "1 × chosen identical to rejected")
    assert report.examples[0] == f"{path}:2: field 'chosen': missing field"
    assert report.examples[1].startswith(f"{path}:4: invalid JSON")
    assert len(report.examples) == 4


def test_error_mode_raises_the_first_bad_record(tmp_path):
    with pytest.raises(DataError) as err:
        read_preference_pairs(_mixed_file(tmp_path))
    assert err.value.line == 2


def test_limit_counts_valid_records(tmp_path):
    pairs, report = read_preference_pairs(_mixed_file(tmp_path), on_invalid="skip", limit=2)
    assert len(pairs) == 2 and pairs[1].source.endswith(":3")
    assert (report.skipped, report.total) == (1, 3)


def test_empty_skip_report_summary():
    assert SkipReport(total=5).summary() == "skipped 0 of 5 records"


# ------------------------------------------------------------------ implicit prompts

def test_implicit_prompt_conversation_is_the_common_message_prefix():
    sys_msg = {"role": "system", "content": "Be kind."}
    turn = [sys_msg, U, A1, {"role": "user", "content": "More?"}]
    a3 = {"role": "assistant", "content": "Sure."}
    pair = validate_pair({"chosen": turn + [a3], "rejected": turn + [A2, U, A1]}, "f", 1)
    assert pair.prompt == turn
    assert (pair.chosen, pair.rejected) == ([a3], [A2, U, A1])
    with pytest.raises(DataError, match="field 'prompt': missing field"):
        validate_pair({"chosen": [A1], "rejected": [A2]}, "f", 2)
    with pytest.raises(DataError, match="f:3: field 'rejected': empty"):
        validate_pair({"chosen": [U, A1], "rejected": [U]}, "f", 3)


def test_ultrafeedback_rows_a_string_prompt_and_whole_conversations():
    """UltraFeedback-binarized: ``prompt`` a string, ``chosen``/``rejected`` conversations that begin with it (the
    most common public DPO format, refused before): the shared user turn is the prompt."""
    row = {"prompt": U["content"], "chosen": [U, A1], "rejected": [U, A2], "score_chosen": 8.0}
    pair = validate_pair(row, "uf", 1)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([U], [A1], [A2])


def test_hh_strings_split_at_the_last_assistant_turn_keeping_the_leading_space():
    prompt = "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nHuman: Then?\n\nAssistant:"
    pair = validate_pair({"chosen": prompt + " Knead it.", "rejected": prompt + " No idea."}, "hh", 1)
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, " Knead it.", " No idea.")
    with pytest.raises(DataError) as err:
        validate_pair({"chosen": prompt + " ", "rejected": prompt + " No idea."}, "hh", 2)
    assert str(err.value) == "hh:2: field 'chosen': empty"


@pytest.mark.data
def test_hh_shared_data_file():
    path = shared_data_dir() / "hh" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    pairs, report = read_preference_pairs(path, on_invalid="skip")
    # The data README promises 4 empty responses; 5 more pairs have chosen/rejected dialogues that
    # diverge before their last "\n\nAssistant:" (a fused or repeated turn), so they share no prompt.
    assert (len(pairs), report.skipped, report.total) == (2303, 9, 2312)
    assert report.reasons == {"field 'chosen': empty": 4, "field 'rejected': prompt differs from chosen's": 5}
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen.strip() for p in pairs)
    assert pairs[0].source == f"{path}:1"



# ------------------------------------------------------------------ SFT

def test_sft_reads_all_three_shapes(tmp_path):
    rows = [
        {"prompt": "Q?", "completion": " A."},
        {"messages": [U, A1, {"role": "user", "content": "Again"}, A2]},
        {"prompt": "Which?", "chosen": " this", "rejected": " that"},  # Preferred-FT: the chosen one
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"},
    ]
    path = _jsonl(tmp_path / "sft.jsonl", rows)
    examples, _ = read_sft_examples(path)
    got = [(e.prompt, e.completion, e.source) for e in examples]
    assert got == [
        ("Q?", " A.", f"{path}:1"),
        ([U, A1, {"role": "user", "content": "Again"}], [A2], f"{path}:2"),
        ("Which?", " this", f"{path}:3"),
        ("\n\nHuman: hi\n\nAssistant:", " hello", f"{path}:4"),
    ]


@pytest.mark.parametrize("row, expected", [
    ({"messages": [U, A1, U]}, "field 'messages': must end with an assistant message"),
    ({"messages": [A1]}, "field 'messages': must end with an assistant message"),
    ({"messages": "hi"}, "field 'messages': expected a list of {role, content} messages, got str"),
    ({"prompt": "q", "completion": ""}, "field 'completion': empty"),
    ({"prompt": "q"}, "field 'completion': missing field"),
    ({"completion": "a"}, "field 'prompt': missing field"),
    ({"prompt": [U], "completion": "a"}, "field 'completion': is a string but 'prompt' is a list"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "field 'chosen': chosen identical to rejected"),
])
def test_sft_bad_records(tmp_path, row, expected):
    path = _jsonl(tmp_path / "sft.jsonl", [row])
    with pytest.raises(DataError) as err:
        read_sft_examples(path)
    assert str(err.value).startswith(f"{path}:1: {expected}")
    examples, report = read_sft_examples(path, on_invalid="skip")
    assert (examples, report.skipped) == ([], 1)


# ------------------------------------------------------------------ JSONL helpers, import cost

def test_write_jsonl_roundtrip_utf8_atomic_and_gz(tmp_path):
    rows = [{"text": "é 中 \n", "n": 1}, {"text": "", "n": 2}]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, rows)
    assert "é 中" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert read_jsonl(path) == rows
    write_jsonl(path, iter(rows[:1]))  # replaces, never appends
    assert read_jsonl(path) == rows[:1]
    write_jsonl(tmp_path / "out.jsonl.gz", rows)
    assert read_jsonl(tmp_path / "out.jsonl.gz") == rows
    with pytest.raises(TypeError):
        write_jsonl(path, [{"bad": object()}])
    assert read_jsonl(path) == rows[:1]  # a failed write leaves the old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]  # no temp file left


def test_read_jsonl_reports_the_bad_line(tmp_path):
    path = _write_lines(tmp_path / "r.jsonl", ['{"a": 1}', "", '{"a": 2', "{}"])
    with pytest.raises(DataError, match=r"r\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "none.jsonl")


def test_import_does_not_load_heavy_libraries():
    code = ("import sys, preftune.data.records; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'datasets', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert out.stdout.strip() == "[]"


def test_csv_row_with_more_cells_than_columns_is_an_error(tmp_path):
    """An unquoted comma made the cells shift (prompt 'Hi', chosen ' there', rejected 'good') and the last one
    vanish, with nothing reported; now an error naming the line, or a counted skip."""
    path = tmp_path / "x.csv"
    path.write_text("prompt,chosen,rejected\nok,a,b\nHi, there,good,bad\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_preference_pairs(path)
    assert str(err.value).startswith(f"{path}:3: 4 cells, but the header names 3 columns")
    pairs, report = read_preference_pairs(path, on_invalid="skip")
    assert [p.prompt for p in pairs] == ["ok"] and "more cells than columns" in str(report.summary())


@pytest.mark.parametrize("line,field", [('{"label": 1, "text": "ok"', None), ('{"label": 2, "text": "t"}', "label"),
                                        ('{"label": 1}', "text"), ("[" * 5000, None)])
def test_imdb_prompts_reader_names_the_bad_line(tmp_path, line, field):
    from preftune.eval.prompts import imdb_prompts

    path = tmp_path / "reviews.jsonl"
    path.write_text('{"label": 0, "text": "a fine film"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        imdb_prompts(path, 2, seed=0)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, field)


def test_a_csv_with_another_delimiter_names_the_columns_it_found(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt;chosen;rejected\nHi;Hello!;Go away.\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_preference_pairs(path)
    assert str(err.value) == (f"{path}:1: the header names one column, 'prompt;chosen;rejected': separated by ';'? "
                              "preftune reads comma-separated CSV (columns found: ['prompt;chosen;rejected'])")
