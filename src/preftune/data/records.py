"""Canonical training records and the readers that produce them.

Every data source (JSONL, JSONL.gz, JSON, CSV, Parquet, a ``datasets.save_to_disk`` directory) is
reduced here to :class:`PreferencePair` or :class:`SFTExample`, each carrying ``source``
(``"file:line"``) so that any later error (a prompt too long, a template failure) can point back to
the exact record. Validation happens once, here, so that nothing downstream re-checks shapes.
Records with several ranked or scored responses per prompt expand into all their ordered pairs
(:mod:`preftune.data.multi`), each pair keeping the record's ``source``.
Heavy libraries (pyarrow, datasets) are imported only by the reader that needs them, which keeps
``import preftune.data.records`` (and the CLI's start-up) fast.
"""

from __future__ import annotations

import collections
import csv
import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict  # {"role": str, "content": str}
Text = str | list[Message]  # a plain string, or a conversation (list of {role, content})

ROLES = ("system", "user", "assistant", "tool")
HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH dialogues: the prompt ends with the last one
FORMATS = ".jsonl, .jsonl.gz, .json, .csv, .parquet or a datasets.save_to_disk directory (DIR[::split])"
TYPE_ERROR = "expected a string or a list of {role, content} messages, got "


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` preferred over ``rejected`` as a continuation of ``prompt``."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str  # "path/to/file.jsonl:17"


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: train on ``completion`` given ``prompt``."""

    prompt: Text
    completion: Text
    source: str


class DataError(ValueError):
    """Bad input, located: ``str(err) == f"{file}:{line}: field '{field}': {message}"``.

    ``reason`` is a short, record-independent key (no positions, no values) used to group skipped
    records in :class:`SkipReport`; it defaults to one derived from ``field`` and ``message``.
    """

    def __init__(self, file: str, line: int | None, field: str | None, message: str, *, reason: str | None = None):
        self.file, self.line, self.field, self.message = file, line, field, message
        self.reason = reason or _default_reason(field, message)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = self.message if self.field is None else f"field '{self.field}': {self.message}"
        return f"{where}: {what}"

    def __reduce__(self):  # keep the error picklable (multiprocessing data workers)
        return (_rebuild_error, (self.file, self.line, self.field, self.message, self.reason))


def _rebuild_error(file, line, field, message, reason) -> DataError:
    return DataError(file, line, field, message, reason=reason)


def _default_reason(field: str | None, message: str) -> str:
    if field is None or message.startswith(field):
        return message
    if message.startswith("missing field"):
        return f"missing field '{field}'"
    return f"field '{field}': {message}"


@dataclass
class SkipReport:
    """What ``on_invalid="skip"`` left out, so a run can log it instead of silently shrinking."""

    skipped: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)  # the first few full error strings
    total: int = 0  # records looked at (valid + skipped)

    def add(self, err: DataError, max_examples: int = 5) -> None:
        self.skipped += 1
        self.reasons[err.reason] += 1
        if len(self.examples) < max_examples:
            self.examples.append(str(err))

    def summary(self) -> str:
        head = f"skipped {self.skipped} of {self.total} records"
        if not self.reasons:
            return head
        return head + ": " + ", ".join(f"{n} × {reason}" for reason, n in self.reasons.most_common())


class _Invalid(Exception):
    """Raised by field checks, which know the field but not the file/line; turned into DataError."""

    def __init__(self, field: str, message: str, reason: str | None = None):
        super().__init__(message)
        self.field, self.message, self.reason = field, message, reason


# ---------------------------------------------------------------- field validation


def _check_messages(value: list, name: str) -> list[Message]:
    """Canonical copies ``{"role", "content"}`` (extra message keys are dropped on purpose)."""
    out = []
    for i, msg in enumerate(value, 1):
        problem = None
        if not isinstance(msg, dict):
            problem = f"expected an object with 'role' and 'content', got {type(msg).__name__}"
        elif not isinstance(msg.get("role"), str):
            problem = "missing 'role'" if msg.get("role") is None else "'role' must be a string"
        elif msg["role"] not in ROLES:
            problem = f"role '{msg['role']}' is not one of {', '.join(ROLES)}"
        elif not isinstance(msg.get("content"), str):
            problem = "missing 'content'" if msg.get("content") is None else "'content' must be a string"
        if problem:
            raise _Invalid(name, f"message #{i}: {problem}", f"field '{name}': bad message ({problem})")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _check_text(value: Any, name: str, *, is_response: bool) -> Text:
    """A non-empty string (kept verbatim: leading spaces matter to tokenizers) or message list."""
    if value is None:
        raise _Invalid(name, "missing field")
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid(name, "empty")
        return value
    if not isinstance(value, list):
        raise _Invalid(name, TYPE_ERROR + type(value).__name__)
    if not value:
        raise _Invalid(name, "empty")
    messages = _check_messages(value, name)
    if is_response and not messages[-1]["content"].strip():
        raise _Invalid(name, "last message has empty content")
    return messages


def _check_same_kind(values: dict[str, Text]) -> None:
    """Mixing a string prompt with message-list responses has no single correct template."""
    first, *rest = values
    kind = {True: "a string", False: "a list of messages"}
    for name in rest:
        if isinstance(values[name], str) != isinstance(values[first], str):
            raise _Invalid(name, f"is {kind[isinstance(values[name], str)]} but '{first}' is "
                           f"{kind[isinstance(values[first], str)]}", f"field '{name}': mixed strings and message lists")


def _normalised(text: Text) -> Any:
    if isinstance(text, str):
        return text.strip()
    return [(m["role"], m["content"].strip()) for m in text]


def _split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Derive the prompt from records that only have ``chosen``/``rejected``.

    Conversations: the prompt is their longest common prefix of messages. Anthropic HH strings:
    the prompt is everything up to and including the last ``"\\n\\nAssistant:"`` and both
    dialogues must share it exactly (some HH pairs diverge earlier; splitting them anyway would
    train on a response to a different conversation).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if k == 0:
            raise _Invalid("prompt", "missing field (and 'chosen'/'rejected' share no leading messages)",
                           "missing field 'prompt'")
        return c[:k], c[k:], r[k:]
    if isinstance(chosen, str) and isinstance(rejected, str) and HH_ASSISTANT in chosen:
        cut_c = chosen.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        cut_r = rejected.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        if cut_r < len(HH_ASSISTANT) or rejected[:cut_r] != chosen[:cut_c]:
            raise _Invalid("rejected", "prompt differs from chosen's (the dialogue up to the last "
                           "'\\n\\nAssistant:': the two diverge earlier, or a response itself contains it)",
                           "field 'rejected': prompt differs from chosen's")
        return chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]
    raise _Invalid("prompt", "missing field (and 'chosen'/'rejected' are neither conversations "
                   "nor Human/Assistant dialogues it could be derived from)", "missing field 'prompt'")


def _pair_fields(raw: dict) -> tuple[Text, Text, Text]:
    for name in ("chosen", "rejected"):
        if raw.get(name) is None:
            raise _Invalid(name, "missing field")
    prompt, chosen, rejected = raw.get("prompt"), raw["chosen"], raw["rejected"]
    if prompt is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    texts = {"prompt": _check_text(prompt, "prompt", is_response=False),
             "chosen": _check_text(chosen, "chosen", is_response=True),
             "rejected": _check_text(rejected, "rejected", is_response=True)}
    _check_same_kind(texts)
    if _normalised(texts["chosen"]) == _normalised(texts["rejected"]):
        raise _Invalid("chosen", "chosen identical to rejected")
    return texts["prompt"], texts["chosen"], texts["rejected"]


def _located(fn: Callable[[dict], Any], raw: Any, file: str, line: int) -> Any:
    if not isinstance(raw, dict):
        raise DataError(file, line, None, f"expected a JSON object, got {type(raw).__name__}",
                        reason="record is not an object")
    try:
        return fn(raw)
    except _Invalid as bad:
        raise DataError(file, line, bad.field, bad.message, reason=bad.reason) from None


def validate_pair(raw: dict, file: str, line: int) -> PreferencePair:
    """Check one raw preference record (explicit or implicit prompt); raise :class:`DataError`."""
    prompt, chosen, rejected = _located(_pair_fields, raw, file, line)
    return PreferencePair(prompt, chosen, rejected, source=f"{file}:{line}")


def validate_preferences(raw: dict, file: str, line: int, *,
                         max_pairs_per_prompt: int | None = None) -> list[PreferencePair]:
    """The pairs of one raw record: a pair record gives itself, a multi-response record
    (``responses`` + ``scores``, scored ``responses`` or ``ranked``) all its ordered pairs, at most
    ``max_pairs_per_prompt`` of them (largest score gaps first; see :mod:`preftune.data.multi`).
    """
    from preftune.data import multi  # here, not at the top: multi builds on this module's checks

    if not (isinstance(raw, dict) and multi.is_multi_response(raw)):
        return [validate_pair(raw, file, line)]
    expanded = _located(lambda r: multi.multi_response_pairs(r, max_pairs_per_prompt), raw, file, line)
    return [PreferencePair(prompt, better, worse, source=f"{file}:{line}") for prompt, better, worse in expanded]


def _sft_fields(raw: dict) -> tuple[Text, Text]:
    if raw.get("messages") is not None:
        messages = _check_text(raw["messages"], "messages", is_response=True)
        if isinstance(messages, str):
            raise _Invalid("messages", TYPE_ERROR.replace("a string or ", "") + "str")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise _Invalid("messages", "must end with an assistant message that follows at least one other")
        return messages[:-1], messages[-1:]
    if raw.get("completion") is not None or raw.get("chosen") is None:
        texts = {"prompt": _check_text(raw.get("prompt"), "prompt", is_response=False),
                 "completion": _check_text(raw.get("completion"), "completion", is_response=True)}
        _check_same_kind(texts)
        return texts["prompt"], texts["completion"]
    prompt, chosen, _ = _pair_fields(raw)  # Preferred-FT: fine-tune on the chosen response
    return prompt, chosen


def validate_sft(raw: dict, file: str, line: int) -> SFTExample:
    """Check one raw SFT record: ``{prompt, completion}``, ``{messages}`` or a preference record."""
    prompt, completion = _located(_sft_fields, raw, file, line)
    return SFTExample(prompt, completion, source=f"{file}:{line}")


# ---------------------------------------------------------------- raw readers: (line, record)


def _iter_jsonl(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, DataError(file, line_no, None, f"invalid JSON: {e.msg} (column {e.colno})",
                                         reason="invalid JSON")


def _iter_json(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(file, e.lineno, None, f"invalid JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(file, None, None, 'expected a top-level list of records or {"data": [...]}')
    yield from enumerate(data, 1)  # line = 1-based record index


def _csv_cell(cell: str) -> Any:
    """Cells are strings; one that parses as a JSON list is a conversation (conversational CSV)."""
    if cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell  # ordinary text that happens to start with "["
        if isinstance(value, list):
            return value
    return cell


def _iter_csv(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        start = reader.line_num + 1  # physical line where the next record begins (header = 1)
        for row in reader:
            if len(row) > len(header):  # zip would shift the cells and drop the last: an unquoted comma?
                yield start, DataError(file, start, None, f"{len(row)} cells, but the header names {len(header)} "
                                       "columns (a comma inside an unquoted cell?)", reason="more cells than columns")
            elif row:
                yield start, {key: _csv_cell(cell) for key, cell in zip(header, row, strict=False)}
            start = reader.line_num + 1


def _iter_parquet(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # lazy: pyarrow costs ~0.3 s to import

    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _iter_saved_dataset(path: Path, file: str, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets  # lazy: slow to import

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(file, None, None, f"not a directory saved by datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(file, None, None, f"no split '{split}'; splits: {', '.join(ds)} (use DIR::split)")
        ds = ds[split]
    yield from enumerate(ds, 1)


def _iter_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, raw record or DataError)`` for any supported format."""
    file = str(path)
    split = None
    if isinstance(path, str) and "::" in path:
        path, split = path.rsplit("::", 1)
    path = Path(path)
    if not path.exists():
        raise DataError(file, None, None, "file not found")
    name = path.name.lower()
    if path.is_dir():
        return _iter_saved_dataset(path, file, split)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _iter_jsonl(path, file)
    readers = {".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}
    if path.suffix.lower() not in readers:
        raise DataError(file, None, None, f"unsupported format '{path.suffix}'; supported: {FORMATS}")
    return readers[path.suffix.lower()](path, file)


def _read(path, convert: Callable[[Any, str, int], list], on_invalid: str,
          limit: int | None) -> tuple[list, SkipReport]:
    """``convert`` turns one raw record into a list (a multi-response record gives several pairs);
    ``limit`` counts the items returned, so the last record's items may be cut short."""
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    records, report, file = [], SkipReport(), str(path)
    for line, raw in _iter_records(path):
        if limit is not None and len(records) >= limit:
            break
        report.total += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            records.extend(convert(raw, file, line))
        except DataError as err:
            if on_invalid == "error":
                raise
            report.add(err)
    return records[:limit], report


def read_preference_pairs(path: str | Path, *, on_invalid: str = "error", limit: int | None = None,
                          max_pairs_per_prompt: int | None = None) -> tuple[list[PreferencePair], SkipReport]:
    """Read and validate preference pairs; ``on_invalid="skip"`` drops bad records into the report.

    Multi-response records expand into their ordered pairs, at most ``max_pairs_per_prompt`` per
    record (those with the largest score gaps). ``limit`` counts pairs, not records.
    """
    cap = max_pairs_per_prompt
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"max_pairs_per_prompt must be a positive integer or None, got {cap!r}")
    return _read(path, lambda raw, file, line: validate_preferences(raw, file, line, max_pairs_per_prompt=cap),
                 on_invalid, limit)


def read_sft_examples(path: str | Path, *, on_invalid: str = "error",
                      limit: int | None = None) -> tuple[list[SFTExample], SkipReport]:
    """Read and validate SFT examples (``{prompt, completion}``, ``{messages}`` or preference pairs)."""
    return _read(path, lambda raw, file, line: [validate_sft(raw, file, line)], on_invalid, limit)


# ---------------------------------------------------------------- plain JSONL helpers


def read_jsonl(path: str | Path) -> list[dict]:
    """All objects of a JSONL(.gz) file; the first bad line raises :class:`DataError`."""
    if not Path(path).exists():
        raise DataError(str(path), None, None, "file not found")
    rows = []
    for line, raw in _iter_jsonl(Path(path), str(path)):
        if isinstance(raw, DataError):
            raise raw
        if not isinstance(raw, dict):
            raise DataError(str(path), line, None, f"expected a JSON object, got {type(raw).__name__}")
        rows.append(raw)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows atomically (temp file + ``os.replace``): a crash never leaves half a file.

    UTF-8 with ``ensure_ascii=False`` so that text stays readable; ``.gz`` paths are gzipped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz") else raw
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            if f is not raw:
                f.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
