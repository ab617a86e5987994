"""The readers that turn data files into canonical records (``preftune.data.schema``).

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
import re
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data import multi
from preftune.data.schema import (FORMATS, Comparison, PreferencePair, SFTExample, check_text, is_comparison,
                                  located, validate_comparison, validate_pair, validate_sft)
from preftune.errors import DataError

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


def validate_preferences(raw: dict, file: str, line: int, *,
                         max_pairs_per_prompt: int | None = None) -> list[PreferencePair]:
    """The pairs of one raw record: a pair record gives itself, a multi-response record
    (``responses`` + ``scores``, scored ``responses`` or ``ranked``) all its ordered pairs, at most
    ``max_pairs_per_prompt`` of them (largest score gaps first; see :mod:`preftune.data.multi`).
    """
    if not (isinstance(raw, dict) and multi.is_multi_response(raw)):
        return [validate_pair(raw, file, line)]
    expanded = located(lambda r: multi.multi_response_pairs(r, max_pairs_per_prompt), raw, file, line)
    return [PreferencePair(prompt, better, worse, source=f"{file}:{line}") for prompt, better, worse in expanded]


# ---------------------------------------------------------------- raw readers: (line, record)

# Text files are read with errors="surrogateescape", so that a byte that is not UTF-8 becomes an error located at its
# line (and skippable with it) rather than a UnicodeDecodeError that ends the read; this finds those bytes.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a pair, a lone one is no character


def _loads(text: str, file: str, line: int | None) -> Any:
    """``json.loads(text)``, or the DataError that says why not: bytes that are not UTF-8, bad syntax, an integer
    longer than Python converts, nesting deeper than its parser recurses, or a lone surrogate (not text)."""
    bad = _UNDECODABLE.search(text)
    if bad:
        line = line or text.count("\n", 0, bad.start()) + 1
        return DataError(file, line, None, f"invalid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})",
                         reason="invalid UTF-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(file, line or e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})",
                         reason="invalid JSON")
    except (ValueError, RecursionError) as e:
        what = ("nested too deeply" if isinstance(e, RecursionError)
                else f"an integer of more than {sys.get_int_max_str_digits()} digits")
        return DataError(file, line, None, f"invalid JSON: {what}", reason="invalid JSON")
    if _SURROGATE_ESCAPE.search(text):  # "\ud83d\ude00" is one character; "\ud800" alone cannot be written out
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            return DataError(file, line, None, "invalid JSON: a \\u escape of a lone surrogate (not a character)",
                             reason="invalid JSON")
    return value


def _iter_jsonl(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape") as f:
            for line_no, text in enumerate(f, 1):
                if text.strip():
                    yield line_no, _loads(text, file, line_no)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, cut short, or damaged
        raise DataError(file, None, None, f"unreadable gzip file ({e})", reason="unreadable gzip file") from None


def _iter_json(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    data = _loads(path.read_text(encoding="utf-8-sig", errors="surrogateescape"), file, None)
    if isinstance(data, DataError):
        raise data
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(file, None, None, 'expected a top-level list of records or {"data": [...]}')
    yield from enumerate(data, 1)  # line = 1-based record index


def _csv_cell(cell: str) -> Any:
    """Cells are strings; one that parses as a JSON list is a conversation (conversational CSV)."""
    if cell.lstrip().startswith("["):
        value = _loads(cell, "", None)
        if isinstance(value, list):
            return value
    return cell  # ordinary text, maybe one that happens to start with "["


def _csv_header(header: list[str], file: str) -> list[str]:
    """The column names; one given twice would make a record take the last one's cell and drop the first."""
    for name in header:
        if _UNDECODABLE.search(name):
            raise DataError(file, 1, None, "invalid UTF-8 in the header", reason="invalid UTF-8")
        if name and header.count(name) > 1:
            raise DataError(file, 1, name, "column given twice in the header")
    if len(header) == 1:  # another delimiter: every record would lack every field but one, named confusingly
        other = next((d for d in (";", "\t", "|") if d in header[0]), None)
        if other is not None:
            raise DataError(file, 1, None, f"the header names one column, {header[0]!r}: separated by {other!r}? "
                            f"preftune reads comma-separated CSV (columns found: {header})",
                            reason="not comma-separated")
    return header


def _csv_record(header: list[str], row: list[str], file: str, line: int) -> Any:
    """One row as a record, or the DataError that says why not."""
    if len(row) > len(header):  # zip would shift the cells and drop the last: an unquoted comma?
        return DataError(file, line, None, f"{len(row)} cells, but the header names {len(header)} "
                         "columns (a comma inside an unquoted cell?)", reason="more cells than columns")
    for name, cell in zip(header, row, strict=False):
        if _UNDECODABLE.search(cell):
            return DataError(file, line, name, "invalid UTF-8", reason="invalid UTF-8")
    return {key: _csv_cell(cell) for key, cell in zip(header, row, strict=False)}


def _iter_csv(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = _csv_header(next(reader, None) or [], file)
            start = reader.line_num + 1  # physical line where the next record begins (header = 1)
            for row in reader:
                if row:
                    yield start, _csv_record(header, row, file, start)
                start = reader.line_num + 1
        except csv.Error as e:  # e.g. a cell over the csv module's field size limit
            raise DataError(file, reader.line_num or None, None, f"unreadable CSV ({e})",
                            reason="unreadable CSV") from None


def _iter_parquet(path: Path, file: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa  # lazy: pyarrow costs ~0.3 s to import
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # not Parquet, cut short, damaged, or a string
        # column holding bytes that are not UTF-8 (pyarrow's IO errors are OSErrors; Arrow does not check strings)
        raise DataError(file, None, None, f"unreadable Parquet file ({e})", reason="unreadable Parquet file") from None


def _iter_saved_dataset(path: Path, file: str, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets  # lazy: slow to import

    unreadable = "unreadable datasets.save_to_disk directory"
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(file, None, None, f"not a directory saved by datasets.save_to_disk ({e})") from None
    except Exception as e:  # a damaged one: datasets raises whatever its JSON and Arrow readers meet, of many types
        raise DataError(file, None, None, f"{unreadable} ({type(e).__name__}: {e})", reason=unreadable) from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(file, None, None, f"no split '{split}'; splits: {', '.join(ds)} (use DIR::split)")
        ds = ds[split]
    try:
        yield from enumerate(ds, 1)
    except UnicodeDecodeError as e:  # a string column holding bytes that are not UTF-8 (Arrow does not check)
        raise DataError(file, None, None, f"{unreadable} ({e})", reason=unreadable) from None


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
                if line is not None:  # one record's fault, not the file's
                    err.hint = "on_invalid=skip would skip this record and count it"
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


def read_comparisons(path: str | Path, *, on_invalid: str = "error",
                     limit: int | None = None) -> tuple[list[Comparison], SkipReport]:
    """``{prompt, a, b}`` records from any supported format, validated (``on_invalid`` as for pairs)."""
    return _read(path, lambda raw, file, line: [validate_comparison(raw, file, line)], on_invalid, limit)


def first_record(path: str | Path) -> Any:
    """The first raw record of a file (None when it has none), to tell what kind of file it is."""
    for _, raw in _iter_records(path):
        return None if isinstance(raw, DataError) else raw
    return None


def holds_comparisons(path: str | Path) -> bool:
    """Whether a file holds ``{prompt, a, b}`` comparisons (else preference pairs)."""
    return is_comparison(first_record(path))


def read_jsonl_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``(line, object)`` for each object of a JSONL(.gz) file; the first bad line raises :class:`DataError`."""
    if not Path(path).exists():
        raise DataError(str(path), None, None, "file not found")
    rows = []
    for line, raw in _iter_jsonl(Path(path), str(path)):
        if isinstance(raw, DataError):
            raise raw
        if not isinstance(raw, dict):
            raise DataError(str(path), line, None, f"expected a JSON object, got {type(raw).__name__}")
        rows.append((line, raw))
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """All objects of a JSONL(.gz) file; the first bad line raises :class:`DataError`."""
    return [row for _, row in read_jsonl_rows(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows atomically (temp file + ``os.replace``): a crash never leaves half a file.

    UTF-8 with ``ensure_ascii=False`` so that text stays readable; ``.gz`` paths are gzipped.
    """
    from preftune.train.rundir import writing

    path = Path(path)
    lines = [(json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows]  # the rows' own errors
    with writing(path, "output"):  # a failed write names the path and its cause; no temporary file is left
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw:
                f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz") else raw
                for line in lines:
                    f.write(line)
                if f is not raw:
                    f.close()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_prompts(path: str | Path) -> list:
    """The ``prompt`` field of each JSONL row: a non-empty string or a non-empty list of {role, content} messages
    (canonical copies, as for pairs); a bad one is a DataError naming its line."""
    prompts = [located(lambda raw: check_text(raw.get("prompt"), "prompt", is_response=False), row, str(path), line)
               for line, row in read_jsonl_rows(path)]
    if not prompts:
        raise DataError(str(path), None, None, "no prompts")
    return prompts
