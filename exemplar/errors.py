"""Errors a user can act on. The CLI prints these as one clear message, never as a traceback."""

from __future__ import annotations


class ExemplarError(Exception):
    """Base class for every error caused by the user's input (config, data, paths)."""


class ConfigError(ExemplarError):
    """The YAML config or a `--set` override is invalid."""


class RowError(ExemplarError):
    """One row of one data file is invalid.

    `location` is human-readable and precise: "line 12" for JSONL, "row 3" for JSON lists,
    Parquet and datasets folders, "line 5" (the physical line) for CSV.
    """

    def __init__(self, file: str, location: str, field: str | None, message: str):
        self.file = file
        self.location = location
        self.field = field
        self.message = message
        where = f"{file}, {location}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # worker processes send their problems back: rebuild from the parts
        return RowError, (self.file, self.location, self.field, self.message)


class DataError(ExemplarError):
    """A data source as a whole is unusable (missing file, unknown format, many invalid rows)."""

    def __init__(self, message: str, problems: list[RowError] | None = None):
        self.problems = problems or []
        super().__init__(message)


class TemplateError(ExemplarError):
    """A chat template cannot be loaded, rendered, or inverted into exact loss masks."""
