"""Where the rows of one dataset come from: a dataset entry of the config, or data given in memory.

In memory (`exemplar.finetune(config, train_data=...)`, `exemplar.prepare_data(...)`), a dataset
is a list of row dicts in any format, a `datasets.Dataset`, or an iterable of conversations
(`Conversation` objects, or lists of OpenAI message dicts). Its rows are named like a file's, so
an error still points at one: source "<train_data>" (or "<eval_data>"), "row N" counted from 1.

`read_conversations(config)` is the other half of the conversation-level seam: it reads the
config's datasets into examples that carry `meta.source`, which a stage can filter or edit and
hand back to `prepare_data(config, train_data=...)` to be tokenized.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from exemplar.config import Config, DatasetSpec
from exemplar.data.formats import check_columns, convert_rows
from exemplar.data.readers import iter_rows, json_type
from exemplar.data.records import source_of, to_record
from exemplar.data.schema import Conversation, Example, SourceRow, TextDocument, TokenizedExample
from exemplar.errors import ConfigError, DataError, RowError

log = logging.getLogger(__name__)

Split = Literal["train", "eval"]
EXAMPLE_TYPES = (Conversation, TextDocument, TokenizedExample)


@dataclass
class Source:
    """One dataset to encode: its spec, and its rows when they are in memory (None: read the file)."""

    spec: DatasetSpec
    rows: Iterable[Any] | None = None

    @property
    def in_memory(self) -> bool:
        return self.rows is not None

    def label(self, config: Config) -> str:
        return self.spec.path if self.in_memory else config.resolve_path(self.spec.path)

    def read(self, config: Config) -> Iterator[SourceRow | RowError]:
        check_columns(self.spec.columns)
        if self.rows is None:
            return iter_rows(self.spec, resolve=config.resolve_path)
        return memory_rows(self.rows, self.spec.path)


def sources(config: Config, split: Split, data: Any = None, data_format: str | None = None) -> list[Source]:
    """The datasets of a split: the in-memory `data` when given (it replaces the config's
    entries for that split), else the config's `data.train` / `data.eval` entries."""
    specs = config.data.train if split == "train" else config.data.eval or []
    if data is None:
        return [Source(spec) for spec in specs]
    _check_memory_data(data, split)
    if specs:
        log.info("%s_data given: the config's data.%s entries are not used", split, split)
    try:
        spec = DatasetSpec(path=f"<{split}_data>", format=data_format or "auto")
    except ValidationError as e:  # an unknown format name
        raise ConfigError(f"data_format: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return [Source(spec, data)]


def train_sources(config: Config, data: Any = None, data_format: str | None = None) -> list[Source]:
    found = sources(config, "train", data, data_format)
    if not found:
        raise ConfigError(
            "no training data: list files under `data.train` in the config, or pass rows in memory "
            "(exemplar.finetune(config, train_data=[...]))"
        )
    return found


def _check_memory_data(data: Any, split: Split) -> None:
    # A DatasetDict can only come from an imported `datasets`; looking there keeps this import-free.
    hf = sys.modules.get("datasets")
    if hf is not None and isinstance(data, (hf.DatasetDict, hf.IterableDatasetDict)):
        raise DataError(f"{split}_data is a DatasetDict: pass one split, e.g. data['{split}']")
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        hint = " (a file goes under `data.train` in the config)" if isinstance(data, str) else ""
        raise DataError(
            f"{split}_data must be a list of row dicts, a datasets.Dataset or an iterable of "
            f"conversations, got {type(data).__name__}{hint}"
        )


def memory_rows(data: Iterable[Any], label: str) -> Iterator[SourceRow | RowError]:
    """In-memory items as rows: dicts as they are, examples as their records, message lists as
    `{"messages": [...]}`; anything else is a RowError at its position."""
    for index, item in enumerate(data):
        location = f"row {index + 1}"
        if isinstance(item, Mapping):
            yield SourceRow(label, location, index, dict(item))
        elif isinstance(item, EXAMPLE_TYPES):
            yield SourceRow(label, location, index, to_record(item))
        elif isinstance(item, list) and all(isinstance(m, Mapping) for m in item):
            yield SourceRow(label, location, index, {"messages": item})
        else:
            yield RowError(
                label,
                location,
                None,
                f"expected a row dict, a Conversation or a list of messages, got {json_type(item)}",
            )


def iter_split(config: Config, split: Split = "train") -> Iterator[tuple[SourceRow, Example] | RowError]:
    """Every row of a split's datasets, converted: (source, example) or the row's RowError."""
    for source in sources(config, split):
        yield from convert_rows(source.read(config), source.spec, {})


def read_conversations(config: Config, split: Split = "train") -> Iterator[Example]:
    """The examples of a split's datasets, in order, each with `meta.source` set; raises the
    first invalid row's RowError (`exemplar data validate` lists them all)."""
    for item in iter_split(config, split):
        if isinstance(item, RowError):
            raise item
        source, example = item
        if "source" not in (example.meta or {}):
            example.meta = {**(example.meta or {}), "source": source_of(source)}
        yield example
