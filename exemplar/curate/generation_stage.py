"""What the generating curation stages (`curate distill`, `curate best-of-k`) share.

- `GenerationWriter`: the stage folder of curate/io.py plus `failed.jsonl`, the prompts whose
  generation still failed after the backend's retries. Each is the input record with
  `meta.failed_by` (the stage) and `meta.error`, so the file is itself a valid input: the prompts
  are never lost and never written as empty answers. `summary.json` counts them under "failed".
- `Sampling`: the settings every request of a stage is sent with (kept in each record's meta).
- `prompt_chunks`: input records in chunks of the generator's preferred batch, with their
  0-based input positions (seeds are derived from them, so a rerun sends the same requests).

Resume: a stage's folder is published only when it finishes (curate/io.py), so a rerun after a
kill runs the stage again; with a server, the backend's on-disk cache (`OUT/http_cache`)
answers every request that was answered before, so no prompt is asked twice. With a local model
folder, a rerun generates again, with the same seeds and so the same answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

from exemplar.curate.io import Record, StageWriter
from exemplar.data.records import dumps
from exemplar.errors import DataError
from exemplar.evaluate.generator import Generator
from exemplar.fsio import atomic_text_writer

FAILED = "failed.jsonl"
CACHE_DIR = "http_cache"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def request_args(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GenerationWriter(StageWriter):
    """A StageWriter that also writes `failed.jsonl`, and whose "in" counts prompts.

    `keep` and `remove` are called once per prompt; `keep_more` adds a further kept row for a
    prompt already kept (best-of-K keeping several responses), so "kept" counts rows of
    kept.jsonl and "kept_prompts" the prompts they answer."""

    def __enter__(self) -> GenerationWriter:
        super().__enter__()
        self.count_failed = 0
        self.extra_rows = 0
        self._failed = self._stack.enter_context(atomic_text_writer(self.out / FAILED))
        self._started = time.perf_counter()
        return self

    def fail(self, record: Record, error: str) -> None:
        self.count_in += 1
        self.count_failed += 1
        meta = {**(record.get("meta") or {}), "failed_by": self.stage, "error": error}
        self._failed.write(dumps({**record, "meta": meta}))

    def keep_more(self, record: Record) -> None:
        self.count_kept += 1
        self.extra_rows += 1
        self._kept.write(dumps(record))

    def note_generator(self, generator: Generator) -> None:
        """Put the backend's counters (and requests per second) into the summary."""
        wall = time.perf_counter() - self._started
        stats = generator.stats.as_dict()
        self.extra["generation"] = {
            **stats,
            "wall_s": round(wall, 2),
            "requests_per_s": round(stats["requests"] / wall, 3) if wall > 0 else None,
        }

    def summary(self) -> dict[str, Any]:
        summary = super().summary()
        summary["failed"] = getattr(self, "count_failed", 0)
        summary["kept_prompts"] = self.count_kept - getattr(self, "extra_rows", 0)
        return summary


def prompt_chunks(records: Iterable[Record], size: int) -> Iterator[list[tuple[int, Record]]]:
    numbered = enumerate(records)
    while chunk := list(islice(numbered, max(1, size))):
        yield chunk


def conversation_messages(record: Record) -> list[dict[str, Any]]:
    """The record's messages; a text or token record is not a prompt (an error naming the row)."""
    if "messages" not in record:
        raise DataError(
            f"{source_text(record)}: not a conversation (text and pre-tokenized rows have no prompt to answer)"
        )
    return [dict(m) for m in record["messages"]]


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The messages sent: `system` first unless the conversation has its own system message."""
    if system is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def request_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat API takes them: the per-message `train` flag is Exemplar's own."""
    return [{k: v for k, v in m.items() if k != "train"} for m in messages]


def source_text(record: Record) -> str:
    where = (record.get("meta") or {}).get("source", {})
    return f"{where.get('path')}, row {where.get('row')}"
