"""The layout every curation stage reads and writes.

Input: files in any supported format (detected per file, as `data.train` entries), or a config's
`data.train`; each row becomes a conversation record (data/records.py) with `meta.source` =
`{"path", "row"}`, the row number `exemplar data validate` prints. An invalid row stops the stage
with the error `validate` would print (nothing is written).

Output, in `--out DIR`:
- `kept.jsonl`: the records kept, in input order;
- `removed.jsonl`: every removed record, with `meta.removed_by` (the stage), `meta.reason` (a
  short name, the key counted in the summary), `meta.reason_detail` (words and numbers), and for
  duplicates `meta.duplicate_of` (the kept row's `meta.source`);
- `summary.json`: `{"in": N, "kept": K, "removed": {REASON: COUNT}, "stage", "options", ...}`.

Crash safety: the two JSONL files are streamed to temporary siblings and renamed into place at
the end; `summary.json` is deleted when a stage starts and written (atomically) only after both
files are in place, so it marks a finished stage: `read_stage` refuses a folder without it, and
a rerun after a crash (any crash, SIGKILL included) starts the stage again and gives the same
folder. One stage at a time per folder (an flock, released by the kernel however the holder dies).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from exemplar.config import Config, DatasetSpec
from exemplar.data.formats import iter_examples
from exemplar.data.records import dumps, to_record
from exemplar.data.sources import iter_split
from exemplar.errors import ConfigError, DataError, RowError
from exemplar.fsio import atomic_text_writer, atomic_write_json
from exemplar.train.run_guard import output_dir_lock

KEPT, REMOVED, SUMMARY = "kept.jsonl", "removed.jsonl", "summary.json"
# Test hook for crash tests: seconds to sleep after each written row, so that a test can kill a
# real stage process while it writes. Unset in normal use.
ROW_DELAY_ENV = "EXEMPLAR_CURATE_ROW_DELAY"

Record = dict[str, Any]


def read_inputs(paths: Iterable[str], config: Config | None = None) -> Iterator[Record]:
    """Records of the given files, in order; without files, of the config's `data.train`."""
    paths = list(paths)
    if not paths and (config is None or not config.data.train):
        raise ConfigError("no input: give files, or --config with datasets under data.train")
    items = (
        (item for path in paths for item in iter_examples(DatasetSpec(path=path)))
        if paths
        else iter_split(config, "train")
    )
    for item in items:
        if isinstance(item, RowError):
            raise DataError(f"{item} (exemplar data validate lists every invalid row)")
        source, example = item
        yield to_record(example, source)


def source(record: Record) -> dict[str, Any]:
    return (record.get("meta") or {}).get("source", {})


class StageWriter:
    """Writes one stage's folder: `keep` and `remove` rows as they are decided, then `finish`.

    Use as a context manager; leaving it with an exception publishes nothing new (the temporary
    files are removed, and a crash that skips even that leaves only hidden `.tmp` files, which
    the next run of a stage on the folder deletes)."""

    def __init__(self, out: str | Path, stage: str, options: dict[str, Any]):
        self.out = Path(out)
        self.stage = stage
        self.options = options
        self.count_in = 0
        self.count_kept = 0
        self.reasons: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self._delay = float(os.environ.get(ROW_DELAY_ENV) or 0)
        self._stack = ExitStack()

    def __enter__(self) -> StageWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(output_dir_lock(self.out))
        (self.out / SUMMARY).unlink(missing_ok=True)  # the folder is not a finished stage from here on
        for stale in self.out.glob(".*.jsonl.*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        self._kept = self._stack.enter_context(atomic_text_writer(self.out / KEPT))
        self._removed = self._stack.enter_context(atomic_text_writer(self.out / REMOVED))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Closing publishes removed.jsonl, then kept.jsonl (or deletes both on an exception).
        self._stack.__exit__(exc_type, exc, tb)
        if exc_type is None:
            atomic_write_json(self.out / SUMMARY, self.summary())

    def keep(self, record: Record) -> None:
        self.count_in += 1
        self.count_kept += 1
        self._kept.write(dumps(record))
        self._wrote()

    def remove(self, record: Record, reason: str, detail: str = "", **meta: Any) -> None:
        self.count_in += 1
        self.reasons[reason] += 1
        record = {
            **record,
            "meta": {**(record.get("meta") or {}), "removed_by": self.stage, "reason": reason},
        }
        if detail:
            record["meta"]["reason_detail"] = detail
        record["meta"].update(meta)
        self._removed.write(dumps(record))
        self._wrote()

    def _wrote(self) -> None:
        if self._delay:
            time.sleep(self._delay)

    def summary(self) -> dict[str, Any]:
        return {
            "in": self.count_in,
            "kept": self.count_kept,
            "removed": dict(sorted(self.reasons.items())),
            "stage": self.stage,
            "options": self.options,
            **self.extra,
        }


def read_stage(out: str | Path) -> dict[str, Any]:
    """The summary of a finished stage's folder; an error when the stage did not finish."""
    path = Path(out) / SUMMARY
    if not path.is_file():
        raise DataError(f"{out}: no {SUMMARY}, so the stage did not finish there; run it again")
    return json.loads(path.read_text(encoding="utf-8"))
