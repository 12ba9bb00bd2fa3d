"""Open formats: `register_format(name, converter)` teaches Exemplar a row shape of the user's own.

The registry is `formats.CONVERTERS`, the same table the built-in formats live in, so a
registered name works everywhere a built-in one does: `format: NAME` in the YAML config,
`data_format="NAME"` in `exemplar.finetune` / `exemplar.prepare_data`, `exemplar data ...`.

A converter takes one row (a dict) and returns a conversation record: a dict in the `messages`
shape (see data/records.py; any other built-in shape such as `{"text": ...}` is accepted too), or
a `Conversation` / `TextDocument` / `TokenizedExample`. What it returns is checked exactly like
a row of a file, and every problem becomes a `RowError` naming the row's file and line:

- the converter raises KeyError (a missing field: the error names it), ValueError, TypeError or
  IndexError: a RowError with the exception's message. Other exceptions are bugs in the
  converter and propagate unchanged, with their traceback;
- it returns anything else: a RowError saying what it returned.

Worker processes: the pipeline forks its workers where the platform can (Linux), and forked
workers inherit the registry. Where it cannot (macOS and Windows spawn), the registered
converters are pickled to the workers, so they must be importable module-level functions there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from exemplar.data.formats import CONVERTERS, FORMATS, to_example
from exemplar.data.schema import Conversation, SourceRow, TextDocument, TokenizedExample
from exemplar.errors import RowError

# The errors a converter raises for a row it cannot convert (others are bugs and propagate).
_ROW_ERRORS = (KeyError, ValueError, TypeError, IndexError)


class UserFormat:
    """A registered converter, adapted to the registry's calling convention (one row's context)."""

    def __init__(self, name: str, converter: Callable[[dict[str, Any]], Any]):
        self.name = name
        self.converter = converter

    def __call__(self, ctx: Any):
        source: SourceRow = ctx.source
        try:
            result = self.converter(dict(source.data))
        except RowError:
            raise
        except _ROW_ERRORS as e:
            raise self._failed(source, e) from None
        if isinstance(result, (Conversation, TextDocument, TokenizedExample)):
            from exemplar.data.records import to_record  # records imports this module's neighbours

            result = to_record(result)
        if not isinstance(result, Mapping):
            raise RowError(
                source.file,
                source.location,
                None,
                f"the converter of format '{self.name}' returned {type(result).__name__}; "
                "expected a record dict like {'messages': [...]} or a Conversation",
            )
        returned = SourceRow(source.file, source.location, source.index, dict(result))
        try:
            return to_example(returned, "auto")
        except RowError as e:
            raise RowError(
                e.file, e.location, e.field, f"the converter of format '{self.name}' returned {e.message}"
            ) from None

    def _failed(self, source: SourceRow, error: Exception) -> RowError:
        if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
            field = error.args[0]
            keys = ", ".join(sorted(map(str, source.data))) or "(none)"
            message = f"missing field '{field}' (keys found: {keys})"
        else:
            field, message = None, f"{type(error).__name__}: {error}"
        return RowError(source.file, source.location, field, f"format '{self.name}': {message}")


def register_format(name: str, converter: Callable[[dict[str, Any]], Any], *, replace: bool = False) -> None:
    """Register `converter` as the format `name`.

    A built-in name (messages, sharegpt, ...) is refused unless `replace=True`, because replacing
    it changes how every file of that format is read; so is a name registered before, so that
    two libraries cannot silently take the same name. "auto" is never a format name.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip() or name == "auto":
        raise ValueError(f"a format name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(converter):
        raise TypeError(f"the converter of format '{name}' must be callable, got {type(converter).__name__}")
    if name in CONVERTERS and not replace:
        kind = "a built-in format" if name in FORMATS else "already registered"
        raise ValueError(f"format '{name}' is {kind}; pass replace=True to replace it")
    CONVERTERS[name] = UserFormat(name, converter)


def unregister_format(name: str) -> None:
    """Remove a registered format; a replaced built-in is left unusable, so that is refused."""
    if name in FORMATS:
        raise ValueError(f"format '{name}' is built in and cannot be removed")
    if name not in CONVERTERS:
        raise KeyError(f"no registered format '{name}'")
    del CONVERTERS[name]


def user_formats() -> dict[str, UserFormat]:
    """The registered (non built-in) entries, for worker processes that do not inherit them."""
    return {name: fmt for name, fmt in CONVERTERS.items() if isinstance(fmt, UserFormat)}


def install(formats: Mapping[str, UserFormat]) -> None:
    """Put `user_formats()` of a parent process into this one's registry (spawned workers)."""
    CONVERTERS.update(formats)
