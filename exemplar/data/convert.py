"""`exemplar data convert`: a split's datasets written as conversation records (data/records.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exemplar.config import Config
from exemplar.data.records import to_record, write_records
from exemplar.data.sources import Split, iter_split
from exemplar.errors import ConfigError, RowError


@dataclass
class ConvertResult:
    path: Path
    rows: int = 0  # rows read
    written: int = 0  # records written
    problems: list[RowError] = field(default_factory=list)  # invalid rows (not written)

    @property
    def ok(self) -> bool:
        return not self.problems


def convert(config: Config, out: str | Path, split: Split = "train") -> ConvertResult:
    """Stream every row of the split's datasets, in order, to `out` as records (written
    atomically: `out` is complete or untouched). Invalid rows are not written; each is in
    `problems`, as `exemplar data validate` reports it. Dataset weights and `eval_fraction` are
    training options and do not apply: every row is written once."""
    specs = config.data.train if split == "train" else config.data.eval
    if not specs:
        raise ConfigError(f"no datasets under data.{split} in the config: nothing to convert")
    result = ConvertResult(Path(out))

    def records() -> Iterator[dict[str, Any]]:
        for item in iter_split(config, split):
            result.rows += 1
            if isinstance(item, RowError):
                result.problems.append(item)
                continue
            source, example = item
            yield to_record(example, source)

    result.written = write_records(result.path, records())
    return result
