"""The errors that mean "bad input", defined here for every layer to raise; the CLI prints them in one line and
exits with status 2. This module imports nothing of preftune's, so any module can use it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, named by its dotted key."""


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


class InputError(ValueError):
    """Another user-facing input problem (missing file, empty data set, wrong option value)."""


def default_reason(field: str | None, message: str) -> str:
    """A short, record-independent key for grouping skipped records (no positions, no values)."""
    if field is None or message.startswith(field):
        return message
    if message.startswith("missing field"):
        return f"missing field '{field}'"
    return f"field '{field}': {message}"


class DataError(ValueError):
    """Bad input, located: ``str(err) == f"{file}:{line}: field '{field}': {message}"``.

    ``reason`` is a short, record-independent key (no positions, no values) used to group skipped
    records in ``SkipReport``; it defaults to one derived from ``field`` and ``message``.
    """

    def __init__(self, file: str, line: int | None, field: str | None, message: str, *, reason: str | None = None):
        self.file, self.line, self.field, self.message = file, line, field, message
        self.reason = reason or default_reason(field, message)
        self.hint = ""  # e.g. that on_invalid=skip would skip the record (set by the reader that raises it)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = self.message if self.field is None else f"field '{self.field}': {self.message}"
        return f"{where}: {what}" + (f" ({self.hint})" if self.hint else "")

    def __reduce__(self):  # keep the error picklable (multiprocessing data workers)
        return (_rebuild_error, (self.file, self.line, self.field, self.message, self.reason))


def _rebuild_error(file, line, field, message, reason) -> DataError:
    return DataError(file, line, field, message, reason=reason)


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelSpecError, InputError,
                                                FileNotFoundError)


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a loss that stays non-finite); the CLI prints it in one line, exit status 3."""


class Interrupted(Exception):
    """A run stopped on SIGTERM or SIGINT after writing a checkpoint; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)


class OutputError(RuntimeError):
    """An output that could not be written (disk full, quota, read-only, file too large), named with its cause; the
    CLI prints it in one line, exit status 74 (EX_IOERR). What was written before it stays intact."""
