"""What `exemplar data preview | validate | stats` show: the library side of those commands."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from exemplar.config import Config
from exemplar.data.encode import Encoder
from exemplar.data.formats import iter_examples
from exemplar.data.lengths import token_counts
from exemplar.data.pipeline import build_masker, prepare_data
from exemplar.data.schema import IGNORE_INDEX, Conversation, Example, SourceRow
from exemplar.data.tokenizer import TokenizerBundle, load_tokenizer
from exemplar.data.turns import every_turn, splits_turns
from exemplar.errors import RowError, TemplateError

# ---------------------------------------------------------------------------------------------
# preview


@dataclass
class PreviewItem:
    index: int  # the row's position in the input (the training datasets in order, from 0)
    source: SourceRow
    input_ids: list[int]
    labels: list[int]
    dropped: str | None
    format: str | None = None  # the format the row's file was read as
    turn: int | None = None  # mask.reasoning every_turn: which of the row's examples (from 0)


def preview_items(
    config: Config, limit: int | None = None, bundle: TokenizerBundle | None = None
) -> Iterator[PreviewItem]:
    """Encode the first `limit` rows of the training datasets, in input order.

    Over-long examples are shown in full with `dropped` set (or truncated, under the truncate
    policy); an invalid row is an item with `dropped` saying why, so every row keeps its index.
    With `mask.reasoning: every_turn` a row gives one item per example made from it.
    """
    bundle = bundle or load_tokenizer(config)
    masker = build_masker(config, bundle)
    full = Encoder(bundle.tokenizer, masker, max_length=sys.maxsize)
    policy = Encoder(bundle.tokenizer, masker, config.max_length, config.truncation)
    split = splits_turns(config.mask)
    index = 0
    for spec in config.data.train:
        decided: dict[str, tuple[str, str]] = {}
        items = iter_examples(spec, config.resolve_path, decided)
        while limit is None or index < limit:
            chunk = list(itertools.islice(items, 256 if limit is None else min(256, limit - index)))
            if not chunk:
                break
            planned = [
                planned_item
                for k, row in enumerate(chunk)
                for planned_item in _plan(index + k, row, decided, masker, split)
            ]
            examples = [example for _, example in planned if example is not None]
            encoded = iter(full.encode(examples))
            for item, example in planned:
                if example is not None:
                    item.input_ids, item.labels, item.dropped = _finish(next(encoded), policy)
                yield item
            index += len(chunk)
        if limit is not None and index >= limit:
            return


def _plan(index: int, item, decided, masker, split: bool) -> list[tuple[PreviewItem, Example | None]]:
    """The preview items of one converted row, each with the example to encode (None: invalid)."""
    if isinstance(item, RowError):
        fmt = decided.get(item.file, (None,))[0]
        where = SourceRow(item.file, item.location, index)
        return [(PreviewItem(index, where, [], [], _invalid(item.field, item.message), fmt), None)]
    src, example = item
    fmt = decided.get(src.file, (None,))[0]
    empty = masker.nothing_to_train(example) if isinstance(example, Conversation) else None
    if empty is not None:
        return [(PreviewItem(index, src, [], [], _invalid("messages", empty), fmt), None)]
    if not (split and isinstance(example, Conversation)):
        return [(PreviewItem(index, src, [], [], None, fmt), example)]
    parts = every_turn(example, masker.trained_messages(example))
    return [(PreviewItem(index, src, [], [], None, fmt, turn), part) for turn, part in enumerate(parts)]


def _finish(enc, policy: Encoder) -> tuple[list[int], list[int], str | None]:
    """An example encoded in full, then under the length policy: over-long ones stay whole."""
    ids, labels, dropped = enc.input_ids, enc.labels, enc.drop_reason
    if dropped is not None and enc.detail:
        dropped = f"{dropped}: {enc.detail}"
    if dropped is None:
        final = policy.finish(ids, labels)
        dropped = final.drop_reason
        if dropped is None:
            ids, labels = final.input_ids, final.labels
    return ids, labels, dropped


def _invalid(field: str | None, message: str) -> str:
    return "invalid: " + (f"field '{field}': " if field else "") + message


def preview_json(item: PreviewItem) -> str:
    """One JSON line: index, format (and turn), then the tokens, or `dropped` with the reason."""
    out: dict[str, Any] = {"index": item.index}
    if item.format is not None:
        out["format"] = item.format
    if item.turn is not None:
        out["turn"] = item.turn
    if item.dropped:
        out["dropped"] = item.dropped
    else:
        out["input_ids"], out["labels"] = item.input_ids, item.labels
    return json.dumps(out)


_TRAINED = "\033[30;42m"  # black on green
_MASKED = "\033[2m"  # dim
_SPECIAL = "\033[1;35m"  # bold magenta
_RESET = "\033[0m"


def use_colour(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def render_preview(item: PreviewItem, tokenizer: Any, colour: bool) -> str:
    """The example as text: trained runs highlighted (or wrapped in [[ ]] without colour), special
    tokens marked. Text is shown as the tokenizer decodes the whole sequence, cut at the mask and
    special-token boundaries, so spaces and multi-byte characters stay whole (a SentencePiece
    token decoded alone loses its space, a character split over byte tokens shows as U+FFFD)."""
    specials = set(tokenizer.all_special_ids)
    trained = [label != IGNORE_INDEX for label in item.labels]
    head = f"── example {item.index} ({item.source.file}, {item.source.location})"
    if item.format:
        head += f" · {item.format}"
    if item.turn is not None:
        head += f" · turn {item.turn}"
    head += f" · {len(item.input_ids)} tokens, {sum(trained)} trained"
    if item.dropped:
        head += f" · DROPPED: {item.dropped}"
    kinds = [(flag, token in specials) for token, flag in zip(item.input_ids, trained, strict=True)]
    bounds = list(_runs(kinds))
    texts = _decoded(tokenizer, item.input_ids, [(a, b) for _, a, b in bounds])
    parts: list[tuple[bool, str]] = []
    for ((run_trained, special), a, b), text in zip(bounds, texts, strict=True):
        if special:
            text = "".join(_special_text(tokenizer, t, colour) for t in item.input_ids[a:b])
        if colour:
            text = (_TRAINED if run_trained else _MASKED) + text + _RESET
        if not colour and run_trained and (not parts or not parts[-1][0]):
            text = "[[" + text
        parts.append((run_trained, text))
        if not colour and run_trained and (b == len(item.input_ids) or not kinds[b][0]):
            parts[-1] = (run_trained, parts[-1][1] + "]]")
    return head + "\n" + "".join(text for _, text in parts) + "\n"


def _runs(kinds: list[tuple[bool, bool]]) -> Iterator[tuple[tuple[bool, bool], int, int]]:
    """Maximal runs of tokens of one kind (trained?, special?); each special token alone."""
    start = 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start] or kinds[start][1]:
            yield kinds[start], start, i
            start = i


def _decoded(tokenizer: Any, ids: list[int], bounds: list[tuple[int, int]]) -> list[str]:
    """The text of each ids[a:b] (consecutive runs) as it stands in the decoded whole sequence."""

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    texts, before = [], ""
    for a, b in bounds:
        upto = decode(ids[:b])
        # A decoder may rewrite what it already gave once more tokens follow; then the run alone.
        texts.append(upto[len(before) :] if upto.startswith(before) else decode(ids[a:b]))
        before = upto
    return texts


def _special_text(tokenizer: Any, token_id: int, colour: bool) -> str:
    text = tokenizer.convert_ids_to_tokens(token_id)
    return f"{_SPECIAL}{text}{_RESET}" if colour else f"⟨{text}⟩"


# ---------------------------------------------------------------------------------------------
# validate


@dataclass
class ValidationResult:
    rows: int = 0
    problems: list[RowError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # data file -> the format it was read as

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(config: Config, bundle: TokenizerBundle | None = None) -> ValidationResult:
    """Check every row of every dataset: its fields, and that the chat template accepts it."""
    bundle = bundle or load_tokenizer(config)
    masker = build_masker(config, bundle)
    result = ValidationResult()
    split = splits_turns(config.mask)
    for spec in [*config.data.train, *(config.data.eval or [])]:
        decided: dict[str, tuple[str, str]] = {}
        result.files.append(config.resolve_path(spec.path))
        for item in iter_examples(spec, config.resolve_path, decided):  # streamed: one row at a time
            result.rows += 1
            if isinstance(item, RowError):
                result.problems.append(item)
                continue
            src, ex = item
            if isinstance(ex, Conversation):
                problem = _conversation_problem(masker, ex, split)
                if problem is not None:
                    result.problems.append(RowError(src.file, src.location, "messages", problem))
        result.formats.update({file: fmt for file, (fmt, _) in decided.items()})
    return result


def _conversation_problem(masker: Any, conv: Conversation, split: bool) -> str | None:
    """Why a conversation cannot train: nothing trained, or the template cannot be followed
    (with every_turn, in any of the examples made from it)."""
    problem = masker.nothing_to_train(conv)
    if problem is not None:
        return problem
    for part in every_turn(conv, masker.trained_messages(conv)) if split else [conv]:
        try:
            masker.render_pieces(part)
        except TemplateError as e:
            return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# stats


def compute_stats(
    config: Config, bundle: TokenizerBundle | None = None, progress: bool = True
) -> dict[str, Any]:
    bundle = bundle or load_tokenizer(config)
    prepared = prepare_data(config, bundle=bundle, progress=progress)
    lengths, trained = token_counts(prepared.train)  # an array: a list would be 40 bytes a row
    turns: Counter[int] = Counter()
    for spec in config.data.train:  # streamed: one converted row at a time
        turns.update(
            _assistant_turns(item[1])
            for item in iter_examples(spec, config.resolve_path)
            if isinstance(item, tuple)
        )
    dropped: Counter[str] = Counter()
    for report in prepared.reports:
        dropped.update(report.dropped)
    total = int(lengths.sum())
    formats = {file: fmt for r in prepared.reports for file, fmt in r.formats.items()}
    extra: dict[str, Any] = {}
    if splits_turns(config.mask):
        extra["every_turn"] = {
            "examples": sum(r.turn_examples for r in prepared.reports),
            "conversations": sum(r.turn_conversations for r in prepared.reports),
        }
    return {
        "rows": sum(r.rows for r in prepared.reports),
        "formats": formats,
        **extra,
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.eval) if prepared.eval is not None else 0,
        "tokens": total,
        "trained_tokens": trained,
        "trained_share": trained / total if total else 0.0,
        "length": _summary(lengths),
        "length_histogram": histogram(lengths, config.max_length),
        "assistant_turns": dict(sorted(turns.items())),
        "dropped": dict(dropped),
        "sources": [r.lines() for r in prepared.reports],
    }


def _assistant_turns(example: Example) -> int:
    if isinstance(example, Conversation):
        return sum(1 for m in example.messages if m.role == "assistant")
    return 0


def _summary(values: Any) -> dict[str, float]:
    if len(values) == 0:
        return {}
    ordered = np.sort(np.asarray(values))

    def pick(q: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "min": int(ordered[0]),
        "mean": float(ordered.mean()),
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": int(ordered[-1]),
    }


def histogram(values: Any, max_length: int, bins: int = 8) -> list[dict[str, int]]:
    """Counts of `values` (a sequence or array of lengths) in `bins` equal bins up to max_length."""
    width = max(1, -(-max_length // bins))
    found = np.asarray(values, dtype=np.int64)
    counts = (
        np.bincount(np.minimum(found // width, bins - 1), minlength=bins) if len(found) else np.zeros(bins)
    )
    return [
        {"from": b * width, "to": min((b + 1) * width, max_length), "count": int(counts[b])}
        for b in range(bins)
    ]


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"rows read        {stats['rows']}",
        f"train examples   {stats['train_examples']}",
        f"eval examples    {stats['eval_examples']}",
        f"tokens           {stats['tokens']}  (trained {stats['trained_tokens']}, {stats['trained_share']:.1%})",
    ]
    length = stats["length"]
    if length:
        lines.append(
            "length           min {min}  mean {mean:.1f}  p50 {p50}  p95 {p95}  max {max}".format(**length)
        )
    lines.append("length histogram")
    peak = max((b["count"] for b in stats["length_histogram"]), default=0) or 1
    for b in stats["length_histogram"]:
        bar = "█" * round(40 * b["count"] / peak)
        lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>7} {bar}")
    lines.append(
        "assistant turns per example: " + ", ".join(f"{k}: {v}" for k, v in stats["assistant_turns"].items())
    )
    if stats["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats["dropped"].items())))
    else:
        lines.append("dropped: none")
    for source in stats["sources"]:
        lines += source
    return "\n".join(lines)
