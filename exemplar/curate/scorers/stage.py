"""The `curate score` stage: every record gets `meta.scores.NAME` from each scorer.

Records are scored a batch at a time (only one batch in memory). A record any scorer failed on is
removed with reason `score_error` (`meta.reason_detail` names the scorer and the error; the scores
that did succeed are kept in its meta); the errors are counted per scorer in `summary.json`
(`score_errors`), with each scorer's `scores` summary (count, mean, min, max) over kept rows.
A scorer's `detail` (e.g. the judge's rationale) goes to `meta.score_details.NAME`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice

from tqdm.auto import tqdm

from exemplar.curate.io import StageWriter
from exemplar.curate.scorers.base import Record, Score, Scorer
from exemplar.errors import ConfigError

REASON = "score_error"


def score_records(
    records: Iterable[Record],
    writer: StageWriter,
    scorers: list[Scorer],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> None:
    names = [s.name for s in scorers]
    if not scorers:
        raise ConfigError("no scorer: give at least one --scorer SPEC")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"two scorers write meta.scores.{repeated[0]}: name them, e.g. --scorer a={repeated[0]}:..."
        )
    if batch_size < 1:
        raise ConfigError("batch size must be at least 1")
    errors: Counter[str] = Counter()
    stats = {name: _Stats() for name in names}
    with tqdm(desc="score", unit=" rows", disable=not progress) as bar:
        for batch in _batches(records, batch_size):
            columns = [_checked(s, s.score(batch), len(batch)) for s in scorers]
            for i, record in enumerate(batch):
                scores = {s.name: column[i] for s, column in zip(scorers, columns, strict=True)}
                _write(record, scores, writer, errors, stats)
            bar.update(len(batch))
    writer.extra["score_errors"] = {name: errors[name] for name in names}
    writer.extra["scores"] = {name: stats[name].summary() for name in names}


def _write(record: Record, scores: dict[str, Score], writer: StageWriter, errors, stats) -> None:
    meta = dict(record.get("meta") or {})
    meta["scores"] = {
        **(meta.get("scores") or {}),
        **{n: s.value for n, s in scores.items() if s.error is None},
    }
    details = {n: s.detail for n, s in scores.items() if s.detail is not None}
    if details:
        meta["score_details"] = {**(meta.get("score_details") or {}), **details}
    record = {**record, "meta": meta}
    failed = [(n, s.error) for n, s in scores.items() if s.error is not None]
    if failed:
        errors.update(n for n, _ in failed)
        writer.remove(record, REASON, "; ".join(f"{n}: {e}" for n, e in failed))
        return
    for n, s in scores.items():
        stats[n].add(s.value)
    writer.keep(record)


def _checked(scorer: Scorer, scores: list[Score], expected: int) -> list[Score]:
    """A scorer's answer for a batch, held to the contract (a bug there must not shift rows)."""
    if len(scores) != expected:
        raise RuntimeError(f"scorer {scorer.name} returned {len(scores)} scores for {expected} records")
    for s in scores:
        if s.error is None and (s.value is None or not math.isfinite(s.value)):
            raise RuntimeError(f"scorer {scorer.name} returned {s.value!r} without an error")
    return scores


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while batch := list(islice(it, size)):
        yield batch


class _Stats:
    def __init__(self) -> None:
        self.count, self.total = 0, 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low, self.high = min(self.low, value), max(self.high, value)

    def summary(self) -> dict[str, float | int | None]:
        if not self.count:
            return {"count": 0, "mean": None, "min": None, "max": None}
        return {"count": self.count, "mean": self.total / self.count, "min": self.low, "max": self.high}
