"""The errors that mean "bad input": the CLI prints them in one line and exits with status 2."""

from __future__ import annotations

from preftune.config import ConfigError
from preftune.data.records import DataError
from preftune.models.load import ModelSpecError


class InputError(ValueError):
    """Another user-facing input problem (missing file, empty data set, wrong option value)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelSpecError, InputError,
                                                FileNotFoundError)
