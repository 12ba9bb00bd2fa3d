"""`exemplar curate mix A:W B:W ...`: datasets mixed by ratio into one file.

Weights are ratios. With `total`, each source gives `total x w / sum(w)` rows (largest remainder
rounding); a source with fewer rows is repeated whole as often as needed and the rest drawn
from it (a warning says so). Without `total`, the ratio is kept with the scarcest source (the
smallest rows/weight) used fully. The rows drawn from a source are a seeded random sample, written
in their file order, and the sources interleaved smoothly (each output position goes to the
source furthest behind its share), so that any prefix of the file has about the ratio.
Rows not drawn go to removed.jsonl (reason `not_sampled`). Two passes over each source: count,
then write; in memory one small count per row, never the rows. `in` counts each input row once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from exemplar.config import Config
from exemplar.curate.io import Record, StageWriter, read_inputs
from exemplar.errors import ConfigError


@dataclass
class Part:
    path: str
    weight: float
    rows: int = 0
    take: int = 0


def parse_part(text: str) -> Part:
    """`PATH:WEIGHT` (the last colon splits, so paths may hold colons); a bare PATH weighs 1."""
    path, sep, weight = text.rpartition(":")
    if not sep or not path:
        return Part(text, 1.0)
    try:
        value = float(weight)
    except ValueError:
        return Part(text, 1.0)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"mix {text!r}: the weight must be a positive number, got {weight!r}")
    return Part(path, value)


def plan(parts: list[Part], total: int | None) -> None:
    """Set each part's `take` from the rows it has, its weight and `total`."""
    weights = sum(p.weight for p in parts)
    if total is None:
        scale = min(p.rows / p.weight for p in parts)
        for p in parts:  # the epsilon keeps 3 x (10 / 3) from rounding down to 9
            p.take = min(p.rows, int(scale * p.weight + 1e-9))
        return
    targets = [total * p.weight / weights for p in parts]
    takes = [int(t) for t in targets]
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(targets[i] - takes[i]), i))
    for i in by_remainder[: total - sum(takes)]:
        takes[i] += 1
    for p, take in zip(parts, takes, strict=True):
        p.take = take


def _drawn(part: Part, rng: random.Random) -> list[int]:
    """How many times each row of the part is written (repeats when take > rows)."""
    whole, rest = divmod(part.take, part.rows) if part.rows else (0, 0)
    counts = [whole] * part.rows
    for i in rng.sample(range(part.rows), rest):
        counts[i] += 1
    return counts


def mix(
    parts: list[Part],
    writer: StageWriter,
    total: int | None = None,
    seed: int = 0,
    config: Config | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    for p in parts:
        p.rows = sum(1 for _ in read_inputs([p.path], config))
        if p.rows == 0:
            raise ConfigError(f"mix: {p.path} has no rows")
    plan(parts, total)
    rng = random.Random(seed)
    counts = [_drawn(p, rng) for p in parts]
    for p in parts:
        if p.take > p.rows:
            log(f"warning: {p.path} has {p.rows} rows and {p.take} are asked for: its rows are repeated")
    streams = [_stream(p, c, writer, config) for p, c in zip(parts, counts, strict=True)]
    written = [0] * len(parts)
    with tqdm(total=sum(p.take for p in parts), desc="mix", unit=" rows", disable=not progress) as bar:
        while True:
            behind = [(written[i] / p.take, i) for i, p in enumerate(parts) if written[i] < p.take]
            if not behind:
                break
            _, i = min(behind)
            writer.keep(next(streams[i]))
            written[i] += 1
            bar.update()
    for stream in streams:  # the not-drawn rows after the last drawn one
        for _ in stream:
            raise AssertionError("a source gave more rows than drawn")
    writer.count_in = sum(p.rows for p in parts)
    writer.extra["sources"] = [
        {"path": p.path, "weight": p.weight, "rows": p.rows, "taken": p.take, "repeated": p.take > p.rows}
        for p in parts
    ]


def _stream(part: Part, counts: list[int], writer: StageWriter, config: Config | None) -> Iterator[Record]:
    """The part's drawn rows in file order (each as often as drawn); the others are removed."""
    for record, count in zip(read_inputs([part.path], config), counts, strict=True):
        if count == 0:
            writer.remove(record, "not_sampled", f"not drawn from {part.path}")
        for _ in range(count):
            yield record
