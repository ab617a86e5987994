"""Fuzzed input ("Nothing lost under faults"): every reader of a user's file, fed random bytes and near-valid records,
either reads valid records or raises the project's input error (DataError naming file, line and field; ConfigError
naming the dotted key; InputError), never another exception (a traceback for the user) and never a garbled record.

Random inputs check the invariants of what is read; valid inputs, written in every format, must read back exactly
(nothing garbled). Inputs that once broke a reader are kept in tests/data/malformed/, one file per case, and read by
``test_malformed_corpus``. Hypothesis runs derandomized (the same examples on every run), within a bounded budget.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import datetime
import io
import json
import math
import re
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from preftune.config import _CHOICES, Config, config_keys, load_config
from preftune.data.records import read_comparisons, read_preference_pairs, read_prompts, read_sft_examples
from preftune.data.schema import HH_ASSISTANT, ROLES, normalised
from preftune.errors import ConfigError, DataError, InputError
from preftune.eval import scorers

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
MALFORMED = Path(__file__).resolve().parents[1] / "data" / "malformed"
HUGE = 10 ** 400  # beyond a float's range; JSON numbers may have any number of digits

# ------------------------------------------------------------------ strategies: values a record may hold

SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # no lone surrogates
TRICKY = st.sampled_from([
    "", " ", "\n", "\t\r\n", "\ufeff", "\ud800", "x\udcff", "é 中 😀", "\x00", "\u2028", "[1, 2]", "[",
    '[{"role": "user", "content": "hi"}]', "null", "NaN", HH_ASSISTANT, "\n\nHuman: hi" + HH_ASSISTANT + " yo",
])
STRINGS = st.one_of(SAFE_TEXT, TRICKY)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([HUGE, -HUGE]), st.floats(), STRINGS)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": STRINGS}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), SCALARS, max_size=3),
    SCALARS,
)
CONVERSATION = st.lists(MESSAGE, max_size=4)
VALUE = st.one_of(STRINGS, CONVERSATION, SCALARS, st.lists(SCALARS, max_size=3),
                  st.dictionaries(STRINGS, SCALARS, max_size=2))
FIELDS = ("prompt", "chosen", "rejected", "responses", "scores", "ranked", "messages", "completion", "a", "b")
RANDOM_RECORD = st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=5)
SCORED = st.one_of(st.fixed_dictionaries({"text": STRINGS, "score": SCALARS}),
                   st.dictionaries(st.sampled_from(["text", "content", "response", "score"]), SCALARS, max_size=3))
MULTI = st.fixed_dictionaries({"prompt": st.one_of(STRINGS, CONVERSATION)}, optional={
    "responses": st.lists(st.one_of(STRINGS, SCORED, CONVERSATION), max_size=4),
    "scores": st.lists(SCALARS, max_size=4), "ranked": st.lists(st.one_of(STRINGS, CONVERSATION), max_size=4)})

U = {"role": "user", "content": "Hi"}
A1, A2 = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Go away."}
HH = "\n\nHuman: Hi" + HH_ASSISTANT
VALID_RECORDS = [
    {"prompt": "Q?", "chosen": " yes", "rejected": " no"},
    {"prompt": [U], "chosen": [A1], "rejected": [A2]},
    {"chosen": [U, A1], "rejected": [U, A2]},
    {"chosen": HH + " Hello!", "rejected": HH + " Go away."},
    {"prompt": "Q?", "responses": ["a", "b", "c"], "scores": [1, 2.5, 0]},
    {"prompt": "Q?", "responses": [{"text": "a", "score": 1}, {"content": "b", "score": 2}]},
    {"prompt": [U], "ranked": [[A1], [A2]]},
    {"messages": [U, A1]},
    {"prompt": "Q?", "completion": " A."},
    {"prompt": "Q?", "a": "x", "b": "y"},
]


@st.composite
def near_valid(draw) -> dict:
    """A valid record of some shape, maybe with a few fields dropped, replaced, wrapped, emptied or nulled."""
    record = json.loads(json.dumps(draw(st.sampled_from(VALID_RECORDS))))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(set(record) | set(FIELDS))))
        action = draw(st.sampled_from(["drop", "replace", "wrap", "empty", "null", "item"]))
        if action == "drop":
            record.pop(key, None)
        elif action == "replace":
            record[key] = draw(VALUE)
        elif action == "wrap":
            record[key] = [record.get(key)]
        elif action in ("empty", "null"):
            record[key] = "" if action == "empty" else None
        elif isinstance(record.get(key), list) and record[key]:
            record[key][draw(st.integers(0, len(record[key]) - 1))] = draw(st.one_of(VALUE, MESSAGE, SCORED))
    return record


RECORDS = st.one_of(RANDOM_RECORD, MULTI, near_valid())
RAW_LINES = st.one_of(st.binary(max_size=24), st.sampled_from([
    b"{", b'{"prompt": "x", "chosen": "a"', b"1" * 5000, b"[" * 5000, b"\xff\xfe", b"NaN", b"\x00",
    b'{"prompt": "x", "chosen": " a", "rejected": " b"} trailing', b'{"a": 1}{"b": 2}', b'"\\ud800"',
    b'{"prompt": "p\xe9", "chosen": "a", "rejected": "b"}', b'{"scores": [' + b"9" * 5000 + b"]}",
]))


def _json_bytes(value, ensure_ascii: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")  # lone surrogates: bad bytes


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` maybe with a BOM, cut short, or with random bytes spliced in."""
    if draw(st.integers(0, 4)) == 0:
        data = codecs.BOM_UTF8 + data
    if data and draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data) - 1))]
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


@st.composite
def jsonl_bytes(draw, records=RECORDS) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(draw(RAW_LINES))
        elif kind == 1:
            lines.append(b"" if draw(st.booleans()) else b"  \t")
        else:
            value = draw(records) if kind > 2 else draw(VALUE)
            lines.append(_json_bytes(value, draw(st.booleans())))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    return draw(damaged(sep.join(lines) + draw(st.sampled_from([b"", sep]))))


@st.composite
def json_bytes(draw) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.one_of(st.binary(max_size=40), RAW_LINES))
    records = draw(st.lists(st.one_of(RECORDS, VALUE), max_size=4))
    shape = draw(st.sampled_from(["list", "data", "other"]))
    value = records if shape == "list" else {"data": records} if shape == "data" else draw(VALUE)
    return draw(damaged(_json_bytes(value, draw(st.booleans()))))


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def csv_bytes(draw) -> bytes:
    header = draw(st.lists(st.one_of(st.sampled_from(FIELDS), SAFE_TEXT), max_size=5))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(header)
    for record in draw(st.lists(RECORDS, max_size=4)):
        row = [_cell(record.get(name, "")) for name in header]
        row += [_cell(v) for v in draw(st.lists(STRINGS, max_size=1))]  # a stray cell beyond the header
        writer.writerow(row)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        data += b'"' + b"x" * 140_000 + b'",a\n'  # a cell over the csv module's field limit
    return draw(damaged(data))


# ------------------------------------------------------------------ what a valid record is


def _assert_text(value, *, response: bool) -> str:
    """A non-empty string, or a non-empty list of canonical messages; encodable as UTF-8. Returns its kind."""
    if isinstance(value, str):
        assert value.strip(), value
        value.encode("utf-8")
        return "str"
    assert isinstance(value, list) and value, value
    for message in value:
        assert type(message) is dict and set(message) == {"role", "content"}, message
        assert message["role"] in ROLES and isinstance(message["content"], str), message
        message["content"].encode("utf-8")
    if response:
        assert value[-1]["content"].strip(), value
    return "messages"


def _assert_source(source: str, path: Path) -> None:
    assert re.fullmatch(re.escape(str(path)) + r":[1-9]\d*", source), source


def _assert_pair(pair, path: Path) -> None:
    kinds = {_assert_text(pair.prompt, response=False), _assert_text(pair.chosen, response=True),
             _assert_text(pair.rejected, response=True)}
    assert len(kinds) == 1, pair
    assert normalised(pair.chosen) != normalised(pair.rejected), pair
    _assert_source(pair.source, path)


def _assert_sft(example, path: Path) -> None:
    kinds = {_assert_text(example.prompt, response=False), _assert_text(example.completion, response=True)}
    assert len(kinds) == 1, example
    _assert_source(example.source, path)


def _assert_comparison(comparison, path: Path) -> None:
    for text in (comparison.prompt, comparison.a, comparison.b):
        assert _assert_text(text, response=True) == "str"
    _assert_source(comparison.source, path)


WHOLE_LINE = re.compile(r"invalid JSON|invalid UTF-8|expected a JSON object|\d+ cells, but|unreadable CSV")


def _assert_data_error(err: DataError, path: Path) -> None:
    """Names the file, and the line with the field, unless the whole line (or file) is unreadable."""
    assert err.file == str(path) and str(err).startswith(str(path)), err
    assert err.line is None or (isinstance(err.line, int) and err.line >= 1), err
    assert err.message and err.reason, err
    assert err.line is None or err.field is not None or WHOLE_LINE.match(err.message), err


READERS = [(read_preference_pairs, _assert_pair), (read_sft_examples, _assert_sft),
           (read_comparisons, _assert_comparison)]


def _read_all(path: Path, skip: bool = False, cap: int | None = None) -> None:
    """Every reader on ``path``: valid records or a DataError, nothing else; at most ``cap`` pairs per record."""
    for read, check in READERS:
        options = {"max_pairs_per_prompt": cap} if read is read_preference_pairs else {}
        try:
            items, report = read(path, on_invalid="skip" if skip else "error", **options)
        except DataError as err:
            _assert_data_error(err, path)
            continue
        for item in items:
            check(item, path)
        assert report.total >= report.skipped
        if options and cap is not None:
            assert all(n <= cap for n in collections.Counter(item.source for item in items).values())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------ random input, every reader


@FUZZ
@given(data=jsonl_bytes(), skip=st.booleans(), gz=st.integers(0, 5), cap=st.sampled_from([None, 1, 2]))
def test_jsonl_reads_or_raises_data_error(work, data, skip, gz, cap):
    import gzip

    path = work / ("f.jsonl" if gz > 1 else "f.jsonl.gz")
    packed = gzip.compress(data, mtime=0)
    path.write_bytes(data if gz > 1 else packed if gz == 0 else packed[: len(packed) // 2])  # 1: cut short
    _read_all(path, skip, cap)


@FUZZ
@given(data=json_bytes(), skip=st.booleans(), cap=st.sampled_from([None, 1, 2]))
def test_json_reads_or_raises_data_error(work, data, skip, cap):
    path = work / "f.json"
    path.write_bytes(data)
    _read_all(path, skip, cap)


@FUZZ
@given(data=csv_bytes(), skip=st.booleans())
def test_csv_reads_or_raises_data_error(work, data, skip):
    path = work / "f.csv"
    path.write_bytes(data)
    _read_all(path, skip)


PARQUET_COLUMN = st.sampled_from(["str", "messages", "strings", "floats", "float", "int", "struct", "bytes"])


def _parquet_value(draw, kind: str):
    text = st.one_of(SAFE_TEXT, st.sampled_from(["", " ", HH_ASSISTANT]))
    values = {
        "str": text, "strings": st.lists(text, max_size=3), "float": st.floats(), "int": st.integers(-2**63, 2**63 - 1),
        "floats": st.lists(st.floats(), max_size=3), "bytes": st.binary(max_size=6),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES + ("bot",)), "content": text}),
                             max_size=3),
        "struct": st.fixed_dictionaries({"text": text, "score": st.floats()}),
    }
    return draw(st.one_of(st.none(), values[kind]))


@st.composite
def parquet_rows(draw) -> list[dict]:
    columns = draw(st.dictionaries(st.sampled_from(FIELDS), PARQUET_COLUMN, min_size=1, max_size=5))
    return [{name: _parquet_value(draw, kind) for name, kind in columns.items()}
            for _ in range(draw(st.integers(1, 3)))]


def _table(rows: list[dict], raw: list[bytes] | None):
    """``rows`` as an Arrow table; ``raw``: its first column replaced by these bytes as strings, which Arrow keeps
    unchecked (so maybe not UTF-8), as a file written by another tool may hold them."""
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    if raw is None:
        return table
    binary = pa.array((raw * len(rows))[: len(rows)], pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())
    return table.set_column(0, table.column_names[0], strings)


RAW_STRINGS = st.one_of(st.none(), st.lists(st.binary(max_size=6), min_size=1, max_size=3))


@settings(FUZZ, max_examples=50)
@given(rows=parquet_rows(), raw=RAW_STRINGS, junk=st.integers(0, 3), cut=st.integers(0, 2000))
def test_parquet_reads_or_raises_data_error(work, rows, raw, junk, cut):
    import pyarrow.parquet as pq

    path = work / "f.parquet"
    pq.write_table(_table(rows, raw), path)
    if junk == 0:  # a damaged file: cut short, or parquet's magic around garbage
        data = path.read_bytes()
        path.write_bytes(data[: cut % len(data)] if cut % 2 else b"PAR1" + data[4:cut] + b"PAR1")
    _read_all(path)


SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json", "data-00000-of-00001.arrow")


@settings(FUZZ, max_examples=15)
@given(rows=parquet_rows(), raw=RAW_STRINGS, split=st.sampled_from([None, "train", "test"]),
       ask=st.sampled_from(["", "::train", "::test", "::nope"]), junk=st.sampled_from((None,) + SAVED_DATASET_FILES),
       content=st.binary(max_size=30))
def test_saved_dataset_reads_or_raises_data_error(work, rows, raw, split, ask, junk, content):
    import shutil

    import datasets

    folder = work / "saved"
    shutil.rmtree(folder, ignore_errors=True)
    ds = datasets.Dataset(_table(rows, raw))
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(folder))
    if junk is not None:
        for file in folder.rglob(junk):
            file.write_bytes(content)
    path = f"{folder}{ask}"
    for read, check in READERS:
        try:
            items, _ = read(path)
        except DataError as err:
            assert err.file == path and err.message, err
            continue
        for item in items:
            check(item, Path(path))


@FUZZ
@given(data=jsonl_bytes(st.one_of(st.fixed_dictionaries({"prompt": VALUE}), RECORDS)))
def test_read_prompts_reads_or_raises_data_error(work, data):
    path = work / "prompts.jsonl"
    path.write_bytes(data)
    try:
        prompts = read_prompts(path)
    except DataError as err:
        _assert_data_error(err, path)
        return
    assert prompts
    for prompt in prompts:
        _assert_text(prompt, response=False)


class _Scorer:
    name = "stub"

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(len(text)) for text in texts]


@FUZZ
@given(data=jsonl_bytes(st.one_of(st.fixed_dictionaries({"completion": VALUE}, optional={"prompt": VALUE}),
                                  RECORDS)))
def test_score_file_scores_or_raises_data_error(work, data):
    src, out = work / "gen.jsonl", work / "scored.jsonl"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scorers, "get_scorer", lambda name: _Scorer())
        try:
            mean = scorers.score_file(src, out, "stub")
        except DataError as err:
            _assert_data_error(err, src)
            assert not out.exists()
            return
        except InputError as err:
            assert str(err).startswith(str(src)) and not out.exists()
            return
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        assert isinstance(row["completion"], str) and isinstance(row.get("prompt", ""), str)
        assert row["score_stub"] == len(row.get("prompt", "") + row["completion"])
    assert math.isclose(mean, sum(r["score_stub"] for r in rows) / len(rows))


# ------------------------------------------------------------------ valid input reads back exactly, in every format

TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=16).filter(lambda s: s.strip())
CANONICAL = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": TEXT}), min_size=1,
                     max_size=3)


def _write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8-sig")
    elif path.suffix == ".csv":
        header = list(records[0])
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([_cell(r[name]) for name in header] for r in records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


FORMAT = st.sampled_from(["jsonl", "json", "csv", "parquet"])


def _csv_safe(fmt: str, *texts) -> None:
    """A CSV cell that parses as a JSON list is read as a conversation, by design (conversational CSV)."""
    if fmt == "csv":
        assume(not any(isinstance(t, str) and t.lstrip().startswith("[") for t in texts))


@settings(FUZZ, max_examples=100)
@given(fmt=FORMAT, conversation=st.booleans(), texts=st.lists(TEXT, min_size=3, max_size=3),
       messages=st.lists(CANONICAL, min_size=3, max_size=3))
def test_valid_pairs_read_back_exactly(work, fmt, conversation, texts, messages):
    prompt, chosen, rejected = messages if conversation else texts
    assume(normalised(chosen) != normalised(rejected))
    if conversation:
        chosen[-1]["content"], rejected[-1]["content"] = texts[1], texts[2]
        assume(normalised(chosen) != normalised(rejected))
    _csv_safe(fmt, *texts)
    path = _write(work / f"valid.{fmt}", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 2)
    pairs, _ = read_preference_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(prompt, chosen, rejected)] * 2
    lines = [int(p.source.rsplit(":", 1)[1]) for p in pairs]
    if fmt == "csv":  # the csv module counts a lone "\r" inside a quoted cell as a line, as many editors do
        assert lines[0] == 2 and lines[1] > lines[0], lines
    else:
        assert lines == [1, 2]


@settings(FUZZ, max_examples=80)
@given(fmt=FORMAT, human=TEXT, responses=st.lists(TEXT.filter(lambda s: HH_ASSISTANT not in s), min_size=2,
                                                  max_size=2, unique_by=str.strip))
def test_hh_dialogues_split_exactly(work, fmt, human, responses):
    prompt = f"\n\nHuman: {human}{HH_ASSISTANT}"
    chosen, rejected = (prompt + r for r in responses)
    assume(chosen.rfind(HH_ASSISTANT) == rejected.rfind(HH_ASSISTANT) == len(prompt) - len(HH_ASSISTANT))
    path = _write(work / f"hh.{fmt}", [{"chosen": chosen, "rejected": rejected}])
    (pair,), _ = read_preference_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, *responses)


@settings(FUZZ, max_examples=80)
@given(fmt=FORMAT, shared=CANONICAL, own=st.lists(CANONICAL, min_size=2, max_size=2))
def test_conversations_split_exactly(work, fmt, shared, own):
    chosen, rejected = own
    assume(normalised(chosen) != normalised(rejected) and chosen[0] != rejected[0])
    path = _write(work / f"conv.{fmt}", [{"chosen": shared + chosen, "rejected": shared + rejected}])
    (pair,), _ = read_preference_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == (shared, chosen, rejected)


@settings(FUZZ, max_examples=100)
@given(fmt=FORMAT, prompt=TEXT, responses=st.lists(TEXT, min_size=2, max_size=4, unique_by=str.strip),
       scores=st.lists(st.one_of(st.integers(-5, 5), st.floats(-1e300, 1e300)), min_size=4, max_size=4),
       objects=st.booleans())
def test_multi_response_pairs_are_the_strictly_ordered_ones(work, fmt, prompt, responses, scores, objects):
    scores = [float(s) for s in scores[: len(responses)]]
    _csv_safe(fmt, prompt, *responses)
    if objects:
        record = {"prompt": prompt, "responses": [{"text": r, "score": s} for r, s in zip(responses, scores)]}
        assume(fmt != "csv")  # a CSV cell of objects reads as a message list, not as scored responses
    else:
        record = {"prompt": prompt, "responses": responses, "scores": scores}
    path = _write(work / f"multi.{fmt}", [record])
    score = dict(zip(responses, scores))
    expected = {(better, worse) for better in responses for worse in responses if score[better] > score[worse]}
    try:
        pairs, _ = read_preference_pairs(path)
    except DataError as err:
        assert not expected and "all responses tied" in str(err)
        return
    assert all(p.prompt == prompt for p in pairs)
    rank = sorted(responses, key=lambda r: -score[r]).index  # ties keep their input order
    assert [(p.chosen, p.rejected) for p in pairs] == sorted(expected, key=lambda bw: (rank(bw[0]), rank(bw[1])))


# ------------------------------------------------------------------ config: YAML files and dotted overrides

KEYS = [key for key, _, _ in config_keys(Config)]
YAML_VALUES = st.sampled_from([
    "nan", ".nan", ".inf", "-.inf", "1e-6", "1.0e-6", "1e999", "null", "none", "None", "~", "true", "yes", "off",
    "0x10", "0o7", "1_000", "1:30", "2001-13-45", "2001-12-14", "2001-12-14T21:59:43.10-05:00", "[1, 2]",
    "{a: 1}", "{beta: 0.2}", "[" * 300, "!!python/object:os.system", "!!binary aGk=", "'quoted'", "&a 1", "*a",
    "1" * 5000, "\x00", "@", "%", "|", "- 1", "", " ", "=", "a=b", "-1", "0", "99999999999999999999", "0.5",
    "sigmoid", "fsdp2", "rmsprop", "tiny", "packed", "\ud800",
])
OVERRIDE_KEYS = st.one_of(st.sampled_from(KEYS), st.sampled_from(["dpo", "data", "", "dpo.", ".beta", "dpo.beta.x",
                                                                  "train..lr", "command", "model.x", " dpo.beta "]),
                          SAFE_TEXT)


def _dotted_prefixes(key: str) -> list[str]:
    parts = key.strip().split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _assert_valid_config(cfg) -> None:
    """Every leaf has its declared type (no NaN for a float) and every choice key one of its choices."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _assert_valid_config(value)
            continue
        hint = typing.get_type_hints(type(cfg))[f.name]
        allowed = typing.get_args(hint) or (hint,)
        assert any(type(value) is t for t in allowed), (f.name, value, hint)
        assert not (isinstance(value, float) and math.isnan(value)), (f.name, value)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        if hasattr(getattr(cfg, section, None), name):
            assert getattr(getattr(cfg, section), name) in choices


def _bases():
    from preftune.recipes.ppo import PPORunConfig
    from preftune.recipes.sft import SFTRunConfig

    return [Config, SFTRunConfig, PPORunConfig]


@settings(FUZZ, max_examples=200)
@given(overrides=st.lists(st.one_of(st.tuples(OVERRIDE_KEYS, st.one_of(YAML_VALUES, STRINGS)), STRINGS), max_size=3),
       base=st.integers(0, 2))
def test_overrides_load_or_raise_config_error(overrides, base):
    texts = [o if isinstance(o, str) else f"{o[0]}={o[1]}" for o in overrides]
    try:
        cfg = load_config(None, texts, base=_bases()[base]())
    except ConfigError as err:
        named = [p for t in texts if "=" in t for p in _dotted_prefixes(t.split("=", 1)[0])]
        assert "key=value" in str(err) or any(f"'{p}'" in str(err) for p in named), (texts, err)
        return
    _assert_valid_config(cfg)


def _yaml_tree(draw, depth: int = 0):
    if depth == 2 or draw(st.integers(0, 2)) == 0:
        return draw(st.one_of(SCALARS, st.sampled_from([datetime.date(2001, 12, 14), [1, 2], {"a": 1}, []])))
    names = st.one_of(st.sampled_from(sorted({k.split(".")[depth] for k in KEYS if k.count(".") >= depth})),
                      SAFE_TEXT, st.integers())
    return {draw(names): _yaml_tree(draw, depth + 1) for _ in range(draw(st.integers(0, 3)))}


@st.composite
def yaml_files(draw) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(lambda t: t.encode("utf-8",
                                                                                                "surrogatepass"))))
    if kind == 1:
        lines = [f"{draw(OVERRIDE_KEYS)}: {draw(YAML_VALUES)}" for _ in range(draw(st.integers(1, 3)))]
        return "\n".join(lines).encode("utf-8", "surrogatepass")
    try:
        tree = _yaml_tree(draw)
        if isinstance(tree, dict) and draw(st.booleans()):
            tree = {"command": draw(st.sampled_from(["dpo", "sft", "", None, 3])), **tree}
        text = yaml.safe_dump(tree, allow_unicode=draw(st.booleans()))
    except (yaml.YAMLError, ValueError):  # a value yaml cannot write (a huge int): not a file a user could have
        assume(False)
    return draw(damaged(text.encode("utf-8", "surrogatepass")))


@settings(FUZZ, max_examples=150)
@given(data=yaml_files(), base=st.integers(0, 2))
def test_yaml_config_loads_or_raises_config_error(work, data, base):
    path = work / "config.yaml"
    path.write_bytes(data)
    try:
        cfg = load_config(path, base=_bases()[base]())
    except ConfigError as err:
        assert str(path) in str(err) or "config key '" in str(err), err
        return
    _assert_valid_config(cfg)


# ------------------------------------------------------------------ regression corpus: inputs that broke a reader

# file in tests/data/malformed/ -> the error it must give. A name says which reader reads it: ``pairs--`` is
# read_preference_pairs (a ``.dir`` is a datasets.save_to_disk directory), ``prompts--`` read_prompts, ``score--``
# score_file, ``config--`` load_config (a ``.yaml`` file, or ``.overrides``: one override per line).
EXPECTED = {
    "pairs--invalid-utf8.jsonl": r"jsonl:2: invalid UTF-8 \(byte 0xe9\)$",
    "pairs--invalid-utf8.json": r"json:1: invalid UTF-8 \(byte 0xe9\)$",
    "pairs--invalid-utf8.csv": r"csv:2: field 'prompt': invalid UTF-8$",
    "pairs--invalid-utf8.parquet": r"parquet: unreadable Parquet file \(.*can't decode byte 0xe9",
    "pairs--invalid-utf8.dir": r"dir: unreadable datasets.save_to_disk directory \(.*can't decode byte 0xe9",
    "pairs--damaged-state.dir": r"dir: unreadable datasets.save_to_disk directory \(JSONDecodeError: ",
    "pairs--deep-nesting.jsonl": r"jsonl:2: invalid JSON: nested too deeply$",
    "pairs--deep-nesting.json": r"json: invalid JSON: nested too deeply$",
    "pairs--long-integer.jsonl": r"jsonl:2: invalid JSON: an integer of more than 4300 digits$",
    "pairs--long-integer.json": r"json: invalid JSON: an integer of more than 4300 digits$",
    "pairs--huge-score.jsonl": r"jsonl:1: field 'scores': score #1 must be finite, got inf$",
    "pairs--lone-surrogate.jsonl": r"jsonl:2: invalid JSON: a \\u escape of a lone surrogate",
    "pairs--not-gzip.jsonl.gz": r"gz: unreadable gzip file \(Not a gzipped file",
    "pairs--truncated.jsonl.gz": r"gz: unreadable gzip file \(Compressed file ended",
    "pairs--not-parquet.parquet": r"parquet: unreadable Parquet file \(",
    "pairs--long-cell.csv": r"csv:2: unreadable CSV \(field larger than field limit",
    "pairs--duplicate-column.csv": r"csv:1: field 'chosen': column given twice in the header$",
    "prompts--not-messages.jsonl": r"jsonl:2: field 'prompt': message #1: expected an object",
    "prompts--line-after-blank.jsonl": r"jsonl:3: field 'prompt': empty$",  # the physical line, not the row
    "score--invalid-utf8.jsonl": r"jsonl:1: invalid UTF-8 \(byte 0xe9\)$",
    "score--lone-surrogate.jsonl": r"jsonl:1: invalid JSON: a \\u escape of a lone surrogate",
    "score--deep-nesting.jsonl": r"jsonl:1: invalid JSON: nested too deeply$",
    "config--bad-date.yaml": r"yaml: invalid YAML: month must be in 1..12$",
    "config--invalid-utf8.yaml": r"yaml: invalid YAML: 'utf-8' codec can't decode byte 0xe9",
    "config--deep-nesting.yaml": r"yaml: invalid YAML: nested too deeply$",
    "config--nan.yaml": r"^config key 'dpo.beta': expected a number, got nan$",
    "config--bad-date.overrides": r"^config key 'dpo.beta': expected float, got str \('2001-13-45'\)$",
    "config--nan.overrides": r"^config key 'train.lr': expected a number, got nan$",
    "config--deep-nesting.overrides": r"^config key 'dpo.beta': expected float, got str",
}


def test_malformed_corpus_is_complete():
    assert sorted(p.name for p in MALFORMED.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_corpus(name, work):
    path, expected = MALFORMED / name, EXPECTED[name]
    reader = name.split("--")[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scorers, "get_scorer", lambda scorer_name: _Scorer())
        read = {"pairs": read_preference_pairs, "prompts": read_prompts,
                "score": lambda p: scorers.score_file(p, work / "never.jsonl", "stub"),
                "config": lambda p: load_config(p) if p.suffix == ".yaml" else load_config(
                    None, p.read_text(encoding="utf-8").splitlines())}[reader]
        with pytest.raises(ConfigError if reader == "config" else DataError) as err:
            read(path)
    # one record's fault also says that on_invalid=skip would skip it: the corpus pins the message before that
    assert re.search(expected, str(err.value).removesuffix(" (on_invalid=skip would skip this record and count it)"))
    if reader != "config":
        assert err.value.file == str(path) and str(err.value).startswith(f"{path}")
    assert not (work / "never.jsonl").exists()


def test_score_file_reads_a_bom(work):
    """score_file now reads JSONL as the data readers do: a UTF-8 BOM is not part of the first row."""
    src = work / "bom.jsonl"
    src.write_bytes(codecs.BOM_UTF8 + b'{"prompt": "ab", "completion": "c"}\r\n')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scorers, "get_scorer", lambda name: _Scorer())
        assert scorers.score_file(src, work / "bom-scored.jsonl", "stub") == 3.0
