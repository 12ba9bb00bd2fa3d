"""Encode one dataset's rows in bounded chunks and write each chunk's tokens to Arrow at once.

Memory stays bounded by the chunk size, not the input size: rows stream from the reader, a chunk
of them is converted, rendered and tokenized, its tokens go to an Arrow IPC stream (the format
`datasets` memory-maps), and only counts and the first few problems stay in memory. With
several processes, the parent reads rows and hands consecutive chunks to worker processes, at
most `2 * num_proc` chunks in flight, and writes the results back in input order, so the output
is exactly the one a single pass gives.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exemplar.config import DatasetSpec
from exemplar.data.encode import ENCODE_BATCH, EncodedColumns, Encoder
from exemplar.data.formats import convert_rows, format_decisions
from exemplar.data.registry import install, user_formats
from exemplar.data.schema import IGNORE_INDEX, Conversation, SourceRow
from exemplar.data.turns import every_turn, splits_turns
from exemplar.errors import RowError

# Rows per chunk in one process: a few tokenizer batches, so tokenizing one batch overlaps
# rendering the next (see Encoder._batches). Workers get one tokenizer batch per chunk: small
# enough that the last chunks spread evenly over the workers.
CHUNK_ROWS = 4 * ENCODE_BATCH
WORKER_CHUNK_ROWS = ENCODE_BATCH
# Below this many rows a single process is faster than starting workers.
PARALLEL_MIN_ROWS = 4096
# Invalid rows kept with their messages (all are counted); enough for any report.
KEPT_PROBLEMS = 1000
TEMPLATE_ERRORS_SHOWN = 5

Encoded = tuple[EncodedColumns, list[tuple[str, str]], list[RowError]]


def token_schema():
    """The Arrow schema of a prepared dataset. `length` (the example's tokens) and
    `trained_tokens` (its labels that are not ignored) let statistics and the training plan read
    two small columns instead of the tokens (see lengths.py)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("row", pa.int64()),
            ("trained_tokens", pa.int32()),
            ("length", pa.int32()),
        ]
    )


def token_features():
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features(
        {
            "input_ids": ints,
            "labels": ints,
            "row": Value("int64"),
            "trained_tokens": Value("int32"),
            "length": Value("int32"),
        }
    )


@dataclass
class Tally:
    """What one dataset's encoding leaves in memory: counts and the first few messages."""

    rows: int = 0  # examples given to the encoder
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    turns_without_stop: int = 0
    template_errors: list[str] = field(default_factory=list)
    invalid: int = 0
    problems: list[RowError] = field(default_factory=list)  # the first KEPT_PROBLEMS
    dropped_fields: Counter = field(default_factory=Counter)  # fields the template did not render
    formats: dict[str, str] = field(default_factory=dict)  # file -> the format it was read as
    conversations: int = 0  # rows the examples came from (several examples a row with every_turn)
    turn_examples: int = 0  # examples made by mask.reasoning: every_turn (0 without it)

    def add(self, columns: EncodedColumns, where: list[tuple[str, str]], problems: list[RowError]) -> None:
        self.rows += len(columns.drop_reasons)
        self.dropped_fields.update(columns.dropped_fields)
        # The examples of one row sit together in `where` (a row never spans two chunks).
        self.conversations += sum(1 for k, place in enumerate(where) if k == 0 or place != where[k - 1])
        self.kept += len(columns.kept)
        self.dropped.update(r for r in columns.drop_reasons if r)
        self.turns_without_stop += int(columns.turns_without_stop)
        for i in sorted(columns.details)[: TEMPLATE_ERRORS_SHOWN - len(self.template_errors)]:
            self.template_errors.append(f"{where[i][0]}, {where[i][1]}: {columns.details[i]}")
        self.invalid += len(problems)
        self.problems += problems[: KEPT_PROBLEMS - len(self.problems)]


def encode_to_arrow(
    rows: Iterable[Any],
    spec: DatasetSpec,
    encoder: Encoder,
    num_proc: int,
    sink: Any,
    on_rows: Callable[[int], Any] | None = None,
) -> Tally:
    """Encode `rows` (read rows or RowErrors) into the pyarrow output stream `sink`."""
    import pyarrow as pa

    tally = Tally()
    decided: dict[str, tuple[str, str]] = {}  # the format each file is read as (convert_rows')
    with pa.ipc.new_stream(sink, token_schema()) as writer:
        for columns, where, problems in encoded_chunks(rows, spec, encoder, num_proc, decided):
            if len(columns.kept):
                writer.write_batch(record_batch(columns, first_row=tally.rows))
            tally.add(columns, where, problems)
            if on_rows is not None:
                on_rows(len(columns.drop_reasons) + len(problems))
    tally.formats = {file: fmt for file, (fmt, _) in decided.items()}
    if encoder.masker is not None and splits_turns(encoder.masker.mask):
        tally.turn_examples = tally.rows
    return tally


def record_batch(columns: EncodedColumns, first_row: int):
    """One chunk's kept examples as an Arrow record batch. Offsets are per batch, so int32 is
    enough whatever the dataset's total size."""
    import pyarrow as pa

    offsets = columns.offsets.astype(np.int32)
    trained = np.concatenate([np.zeros(1, np.int64), np.cumsum(columns.labels != IGNORE_INDEX)])
    arrays = [
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(columns.input_ids, type=pa.int32())),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(columns.labels, type=pa.int32())),
        pa.array(columns.kept + first_row, type=pa.int64()),
        pa.array(np.diff(trained[offsets]).astype(np.int32)),
        pa.array(np.diff(offsets)),
    ]
    return pa.record_batch(arrays, schema=token_schema())


def encode_examples(encoder: Encoder, converted: Iterable[Any], on_batch=None) -> Encoded:
    """The conversation-level seam: (source, example) pairs, or RowErrors in their place, as
    `formats.convert_rows` yields them, in; token columns out: (columns, where, problems).
    A stage that reads or edits conversations (curation) sits between the two."""
    where: list[tuple[str, str]] = []
    problems: list[RowError] = []
    masker = encoder.masker
    split = masker is not None and splits_turns(masker.mask)

    def examples():
        for item in converted:
            if isinstance(item, RowError):
                problems.append(item)
                continue
            src, example = item
            empty = (
                encoder.masker.nothing_to_train(example)
                if encoder.masker and isinstance(example, Conversation)
                else None
            )
            if empty is not None:
                problems.append(RowError(src.file, src.location, "messages", empty))
                continue
            parts = [example]
            if split and isinstance(example, Conversation):
                parts = every_turn(example, masker.trained_messages(example))
            for part in parts:
                where.append((src.file, src.location))
                yield part

    columns = encoder.encode_columns(examples(), on_batch=on_batch)
    return columns, where, problems


def encoded_chunks(
    rows: Iterable[Any],
    spec: DatasetSpec,
    encoder: Encoder,
    num_proc: int,
    formats: dict[str, tuple[str, str]] | None = None,
) -> Iterator[Encoded]:
    """Each chunk of rows encoded, in input order: here, or in workers when there are many rows."""
    source = iter(rows)
    head = list(itertools.islice(source, PARALLEL_MIN_ROWS + 1))
    if num_proc > 1 and len(head) > PARALLEL_MIN_ROWS:
        yield from _in_workers(itertools.chain(head, source), spec, encoder, num_proc, formats)
        return
    formats = {} if formats is None else formats  # the `format: auto` decisions, kept across chunks
    for chunk in _chunked(itertools.chain(head, source), CHUNK_ROWS):
        yield encode_examples(encoder, convert_rows(chunk, spec, formats))


def _chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    source = iter(items)
    return iter(lambda: list(itertools.islice(source, size)), [])


# What a worker process encodes with, set once by the pool's initializer.
_WORKER: tuple[Encoder, DatasetSpec] | None = None


def _in_workers(
    rows: Iterator[Any], spec: DatasetSpec, encoder: Encoder, num_proc: int, decided: dict | None = None
) -> Iterator[Encoded]:
    """Chunks encoded by `num_proc` worker processes, each with its tokenizer on one core."""
    fork = "fork" in mp.get_all_start_methods()
    # Set before the fork, so the tokenizers library runs single-threaded in each worker and
    # stays quiet about forking after using its thread pool.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        # Forked workers inherit the encoder; spawned ones get it (and the registered formats,
        # which they would otherwise lack) pickled once each.
        context = mp.get_context("fork" if fork else "spawn")
        pool = context.Pool(num_proc, initializer=_start_worker, initargs=(encoder, spec, user_formats()))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    decided = {} if decided is None else decided
    pending: deque = deque()
    with pool:
        for chunk in _chunked(rows, WORKER_CHUNK_ROWS):
            # A chunk converts with the `format: auto` decisions a single pass would have made
            # before its first row.
            pending.append(pool.apply_async(_encode_chunk, (chunk, dict(decided))))
            _learn_formats(decided, chunk, spec)
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _learn_formats(decided: dict[str, tuple[str, str]], chunk: list[Any], spec: DatasetSpec) -> None:
    if spec.format != "auto":  # a forced format: recorded per file, as convert_rows does
        for item in chunk:
            if isinstance(item, SourceRow):
                decided.setdefault(item.file, (spec.format, item.location))
        return
    for file, (_, fmt, where) in format_decisions(chunk, spec).items():
        decided.setdefault(file, (fmt, where))


def _start_worker(encoder: Encoder, spec: DatasetSpec, formats: dict[str, Any]) -> None:
    global _WORKER
    install(formats)
    _WORKER = (encoder, spec)


def _encode_chunk(chunk: list[Any], decided: dict[str, tuple[str, str]]) -> Encoded:
    if _WORKER is None:
        raise RuntimeError("worker started without its encoder")
    encoder, spec = _WORKER
    return encode_examples(encoder, convert_rows(chunk, spec, decided))
