"""Turn canonical examples into `input_ids` and `labels`, in batches, with the length policy.

Each rendered conversation arrives as pieces (see `masking.py`); `pieces.PieceTokenizer`
tokenizes them as the inference stack tokenizes the rendered text (section by section between the
template's special tokens, message content as plain text), with a trained flag per token. This
module joins each row's chunks into examples, sets the labels, and applies truncation or dropping,
with array operations over a whole batch at a time.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exemplar.data.length_bound import TokenLowerBound
from exemplar.data.masking import ChatMasker, Piece
from exemplar.data.pieces import Chunk, PieceTokenizer
from exemplar.data.schema import IGNORE_INDEX, Conversation, Example, TextDocument, TokenizedExample
from exemplar.errors import TemplateError

# Where a word ends (a non-space character before whitespace), searched for at most WORD_SEARCH
# characters past the cut a truncated row needs.
_WORD_END = re.compile(r"\S\s")
WORD_SEARCH = 4096

# Why an example was not kept. These names appear in reports and `data stats`.
DROP_TOO_LONG = "too_long"
DROP_NO_TRAINED = "no_trained_tokens"
DROP_NO_TRAINED_AFTER_TRUNCATION = "no_trained_tokens_after_truncation"
DROP_TEMPLATE = "template_error"

# Examples per tokenizer call: large batches keep the tokenizer's threads busy.
ENCODE_BATCH = 2048
# Under `truncation: truncate`, a row whose text surely holds more than max_length + CUT_SLACK
# tokens is tokenized only up to there (see Encoder._bounded): the slack keeps the tokens near the
# cut, which text after it could have changed, past the max_length that are kept.
CUT_SLACK = 64


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    drop_reason: str | None = None
    turns_without_stop: int = 0
    detail: str | None = None  # for template errors: the message
    dropped_fields: Counter = field(default_factory=Counter)  # fields the template did not render


@dataclass
class EncodedColumns:
    """Many encoded examples in columnar form: the kept ones' tokens back to back, and every
    example's outcome. What the data pipeline stores (as Arrow list columns)."""

    input_ids: np.ndarray  # int32: the kept examples' ids, concatenated
    labels: np.ndarray  # int32, aligned with input_ids
    offsets: np.ndarray  # int64 [kept + 1]: kept example k is input_ids[offsets[k]:offsets[k + 1]]
    kept: np.ndarray  # int64: the index (in the input) of each kept example
    drop_reasons: list[str | None]  # per input example
    turns_without_stop: int = 0  # summed over every rendered conversation
    details: dict[int, str] = field(default_factory=dict)  # template error messages by input index
    # Message fields the template did not render ("reasoning_content", "tool_calls", "content"):
    # summed over every rendered conversation, kept or not (see masking.RenderedChat).
    dropped_fields: Counter = field(default_factory=Counter)

    @staticmethod
    def concat(parts: Sequence[EncodedColumns], starts: Sequence[int]) -> EncodedColumns:
        """Join the results of consecutive slices of one input (`starts`: each slice's first index)."""
        ids = np.concatenate([p.input_ids for p in parts]) if parts else np.zeros(0, np.int32)
        labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32)
        offsets, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return EncodedColumns(
            ids,
            labels,
            np.concatenate(offsets),
            np.concatenate(
                [p.kept + s for p, s in zip(parts, starts, strict=True)] or [np.zeros(0, np.int64)]
            ),
            [r for p in parts for r in p.drop_reasons],
            sum(p.turns_without_stop for p in parts),
            {i + s: d for p, s in zip(parts, starts, strict=True) for i, d in p.details.items()},
            sum((p.dropped_fields for p in parts), Counter()),
        )


class Encoder:
    """Encodes examples to (input_ids, labels) with the truncation policy applied."""

    def __init__(self, tokenizer: Any, masker: ChatMasker | None, max_length: int, truncation: str = "drop"):
        self.pieces = PieceTokenizer(tokenizer.backend_tokenizer)
        self.masker = masker
        self.max_length = max_length
        self.truncation = truncation
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        probe = tokenizer("a")["input_ids"]
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        # A row whose text alone surely exceeds max_length is dropped without tokenizing it, or,
        # truncated, only its start is tokenized (a huge row would need gigabytes): see
        # length_bound.py and `_bounded`.
        self.length_bound = TokenLowerBound(tokenizer.backend_tokenizer)

    # -- one batch: render, then tokenize ---------------------------------------------------

    def _render(self, examples: Sequence[Example]) -> tuple[list[Any], Any]:
        """Render every example into pieces. Returns per-example slots and the tokenizer plan of
        the rows (sections without content resolved, the others queued)."""
        rows: list[list[Piece]] = []
        slots: list[Any] = []  # per example: (row index, rendered chat, cut_trained) or an Encoded
        for ex in examples:
            if isinstance(ex, Conversation):
                if self.masker is None:
                    raise TemplateError("conversations need a chat template")
                try:
                    rendered = self.masker.render_pieces(ex)
                except TemplateError as e:
                    slots.append(Encoded([], [], DROP_TEMPLATE, detail=str(e)))
                    continue
                pieces, cut_trained = self._bounded(rendered.pieces)
                if pieces is None:
                    slots.append(Encoded([], [], DROP_TOO_LONG))
                    continue
                slots.append((len(rows), rendered, cut_trained))
                rows.append(pieces)
            elif isinstance(ex, TextDocument):
                pieces, cut_trained = self._bounded([Piece(ex.text, content=True, trained=True)])
                if pieces is None:
                    slots.append(Encoded([], [], DROP_TOO_LONG))
                    continue
                slots.append((len(rows), None, cut_trained))
                rows.append(pieces)
            elif isinstance(ex, TokenizedExample):
                labels = ex.labels if ex.labels is not None else list(ex.input_ids)
                slots.append(Encoded(list(ex.input_ids), list(labels)))
            else:
                raise TypeError(f"not an example: {type(ex).__name__}")
        return slots, self.pieces.plan(rows)

    def _bounded(self, pieces: list[Piece]) -> tuple[list[Piece] | None, bool]:
        """The pieces to tokenize under the length policy, and whether trained text was cut off.

        drop: None when the pieces' text alone needs more than max_length tokens. Only rows with
        a trained piece: one with none is dropped as having nothing to train, a reason that
        comes first.

        truncate: the shortest prefix of pieces whose text surely needs more than max_length +
        CUT_SLACK tokens, cut in a message's content after a word (before whitespace, where
        pre-tokenizers split) when one ends within WORD_SEARCH characters; template text is
        never cut. The prefix is tokenized as the whole row would be up to the last pre-token
        before the cut: only tokens near the cut can depend on the text after it, and the slack
        puts them past max_length, so the kept max_length tokens are those of the whole row (a
        hypothesis test compares both). Rows the bound does not cover are tokenized whole."""
        texts = [p.text for p in pieces]
        if self.truncation == "drop":
            too_long = any(p.trained for p in pieces) and self.length_bound.exceeds(texts, self.max_length)
            return (None if too_long else pieces), False
        found = self.length_bound.covering_prefix(texts, self.max_length + CUT_SLACK)
        if found is None:
            return pieces, False
        k, chars = found
        piece = pieces[k]
        if not piece.content:
            chars = len(piece.text)
        elif chars < len(piece.text):
            word_end = _WORD_END.search(piece.text, chars - 1, chars + WORD_SEARCH)
            chars = word_end.start() + 1 if word_end else chars
        kept = pieces[:k] + ([Piece(piece.text[:chars], piece.content, piece.trained)] if chars else [])
        cut_off = [Piece(piece.text[chars:], piece.content, piece.trained), *pieces[k + 1 :]]
        return kept, any(p.trained and p.text for p in cut_off)

    def _batches(
        self, examples: Iterable[Example]
    ) -> Iterator[tuple[Sequence[Example], list[Any], list[list[Chunk]]]]:
        """(examples, slots, each row's chunks) per batch of ENCODE_BATCH examples. The tokenizer
        (which releases the GIL and runs on every core) works on one batch while Python reads,
        converts and renders the next (`examples` may be a lazy iterator)."""
        source = iter(examples)
        chunks = iter(lambda: list(itertools.islice(source, ENCODE_BATCH)), [])
        first = next(chunks, None)
        if first is None:
            return
        second = next(chunks, None)
        batches = itertools.chain([first] if second is None else [first, second], chunks)
        # Nothing to overlap with one batch, nor when the content is tokenized word by word in
        # Python (that holds the GIL: a second thread would only take turns with this one).
        if second is None or not self.pieces.releases_gil:
            for chunk in batches:
                slots, (plan, queues) = self._render(chunk)
                yield chunk, slots, self.pieces.resolve(plan, self.pieces.content_ids(queues))
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for chunk in batches:
                slots, (plan, queues) = self._render(chunk)
                job = (chunk, slots, plan, pool.submit(self.pieces.content_ids, queues))
                if pending is not None:
                    yield self._finish_batch(pending)
                pending = job
            yield self._finish_batch(pending)

    def _finish_batch(self, job):
        chunk, slots, plan, future = job
        return chunk, slots, self.pieces.resolve(plan, future.result())

    # -- public -----------------------------------------------------------------------------

    def encode(self, examples: list[Example]) -> list[Encoded]:
        results = []
        for chunk, slots, rows in self._batches(examples):
            for ex, slot in zip(chunk, slots, strict=True):
                if isinstance(slot, Encoded):
                    results.append(slot if slot.drop_reason else self.finish(slot.input_ids, slot.labels))
                    continue
                row, rendered, cut_trained = slot
                input_ids, labels = [], []
                for chunk_ids, trained in rows[row]:
                    input_ids += chunk_ids
                    if trained is True:
                        labels += chunk_ids
                    elif trained is False:
                        labels += [IGNORE_INDEX] * len(chunk_ids)
                    else:
                        labels += [t if f else IGNORE_INDEX for t, f in zip(chunk_ids, trained, strict=True)]
                if isinstance(ex, TextDocument):
                    input_ids, labels = self._document_ends(input_ids, labels)
                result = self.finish(input_ids, labels, cut_trained)
                if rendered is not None:
                    result.turns_without_stop = rendered.turns_without_stop
                    result.dropped_fields = rendered.dropped_fields
                results.append(result)
        return results

    def encode_columns(
        self, examples: Iterable[Example], on_batch: Callable[[int], Any] | None = None
    ) -> EncodedColumns:
        """Like `encode`, straight into flat int32 columns (no per-example lists kept).

        Each batch's chunks are flattened into one array, and the labels, lengths, drops and
        truncation are computed with array operations. `on_batch(n)` is called after each batch
        of n examples (a progress bar's update)."""
        ids_parts, labels_parts, lengths_parts, kept_parts = [], [], [], []
        reasons: list[str | None] = []
        details: dict[int, str] = {}
        no_stop_total = 0
        dropped_fields: Counter = Counter()
        base = 0
        for chunk, slots, rows in self._batches(examples):
            flat: list[Sequence[int]] = []  # every chunk of every example, in order
            trained: list[Any] = []  # per chunk: True, False, or a flag per token
            explicit: dict[int, Sequence[int]] = {}  # chunk index -> its labels (pre-tokenized rows)
            counts: list[int] = []  # chunks per example
            for ex, slot in zip(chunk, slots, strict=True):
                before = len(flat)
                if isinstance(slot, Encoded):
                    if slot.detail:
                        details[base + len(counts)] = slot.detail
                    if slot.drop_reason is None:  # pre-tokenized: its own labels
                        explicit[len(flat)] = slot.labels
                        flat.append(slot.input_ids)
                        trained.append(False)
                    counts.append(len(flat) - before)
                    continue
                row, rendered, _ = slot
                if rendered is not None:  # counted for every rendered conversation, kept or not
                    no_stop_total += rendered.turns_without_stop
                    dropped_fields.update(rendered.dropped_fields)
                document = isinstance(ex, TextDocument)
                if document and self.adds_bos:
                    flat.append((self.bos_id,))
                    trained.append(False)
                for chunk_ids, chunk_trained in rows[row]:
                    flat.append(chunk_ids)
                    trained.append(chunk_trained)
                if document and self.eos_id is not None:
                    flat.append((self.eos_id,))
                    trained.append(True)
                counts.append(len(flat) - before)
            columns = self._columns(flat, trained, explicit, counts, slots)
            ids_parts.append(columns[0])
            labels_parts.append(columns[1])
            lengths_parts.append(columns[2])
            kept_parts.append(columns[3] + base)
            reasons += columns[4]
            base += len(chunk)
            if on_batch is not None:
                on_batch(len(chunk))
        lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, np.int64)
        return EncodedColumns(
            np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
            np.concatenate(labels_parts) if labels_parts else np.zeros(0, np.int32),
            np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)]),
            np.concatenate(kept_parts) if kept_parts else np.zeros(0, np.int64),
            reasons,
            no_stop_total,
            details,
            dropped_fields,
        )

    def _columns(self, flat, trained, explicit, counts, slots):
        """One batch: (ids, labels, kept lengths, kept example indices, drop reason per example)."""
        piece_lengths = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
        total = int(piece_lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int32, count=total)
        if all(type(flag) is bool for flag in trained):
            mask = np.repeat(np.asarray(trained, dtype=bool), piece_lengths)
        else:  # some chunks carry a flag per token
            per_token = (
                itertools.repeat(flag, n) if type(flag) is bool else flag
                for flag, n in zip(trained, piece_lengths.tolist(), strict=True)
            )
            mask = np.fromiter(itertools.chain.from_iterable(per_token), dtype=bool, count=total)
        labels = np.where(mask, ids, np.int32(IGNORE_INDEX)).astype(np.int32, copy=False)
        if explicit:  # pre-tokenized examples bring their own labels
            piece_starts = np.cumsum(piece_lengths) - piece_lengths
            for p, piece_labels in explicit.items():
                start = int(piece_starts[p])
                labels[start : start + len(piece_labels)] = piece_labels
            mask = labels != IGNORE_INDEX
        # Per example (prefix sums over chunks and tokens: empty examples need no special case).
        piece_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.asarray(counts, dtype=np.int64))])
        token_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(piece_lengths)])[piece_bounds]
        trained_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(mask, dtype=np.int64)])[
            token_bounds
        ]
        starts, lengths = token_bounds[:-1], np.diff(token_bounds)
        trained_after_first = np.diff(trained_bounds)
        if total:  # a trained label at position 0 has no preceding token to predict it from
            trained_after_first -= (lengths > 0) & (labels[np.minimum(starts, total - 1)] != IGNORE_INDEX)
        # The length policy.
        limit = lengths.copy()
        reasons: list[str | None] = []
        truncated = False
        for k, slot in enumerate(slots):
            if isinstance(slot, Encoded) and slot.drop_reason is not None:
                reasons.append(slot.drop_reason)
            elif trained_after_first[k] <= 0:
                # A row tokenized only up to a cut (see _bounded) with trained text after it:
                # whole, it would have had that text to train, past max_length.
                cut_trained = not isinstance(slot, Encoded) and slot[2]
                reasons.append(DROP_NO_TRAINED_AFTER_TRUNCATION if cut_trained else DROP_NO_TRAINED)
            elif lengths[k] > self.max_length:
                if self.truncation == "drop":
                    reasons.append(DROP_TOO_LONG)
                else:
                    start = int(starts[k])
                    if (labels[start + 1 : start + self.max_length] != IGNORE_INDEX).any():
                        limit[k] = self.max_length
                        truncated = True
                        reasons.append(None)
                    else:
                        reasons.append(DROP_NO_TRAINED_AFTER_TRUNCATION)
            else:
                reasons.append(None)
        keep = np.fromiter((r is None for r in reasons), dtype=bool, count=len(reasons))
        kept = np.flatnonzero(keep).astype(np.int64)
        if truncated:
            position = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
            keep_token = position < np.repeat(np.where(keep, limit, 0), lengths)
        elif keep.all():
            return ids, labels, lengths, kept, reasons
        else:
            keep_token = np.repeat(keep, lengths)
        return ids[keep_token], labels[keep_token], limit[keep], kept, reasons

    def encode_prompt(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        """Token ids of a prompt for generation: the conversation so far and the assistant's
        header, tokenized as training tokenizes the same text (as inference does, with
        special-token strings in message content kept as text)."""
        if self.masker is None:
            raise TemplateError("prompts need a chat template")
        pieces = self.masker.prompt_pieces(messages, tools)
        return [token for chunk_ids, _ in self.pieces.encode_rows([pieces])[0] for token in chunk_ids]

    def _document_ends(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Plain text gets the tokenizer's BOS (if it normally adds one) and a trained EOS."""
        if self.adds_bos:
            ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
        if self.eos_id is not None:
            ids, labels = [*ids, self.eos_id], [*labels, self.eos_id]
        return ids, labels

    def finish(self, ids: list[int], labels: list[int], cut_trained: bool = False) -> Encoded:
        """Apply the length policy; drop examples left with nothing to train (`cut_trained`: the
        row was tokenized only up to a cut, with trained text after it; see `_bounded`)."""
        if not _has_target(labels):
            return Encoded([], [], DROP_NO_TRAINED_AFTER_TRUNCATION if cut_trained else DROP_NO_TRAINED)
        if len(ids) > self.max_length:
            if self.truncation == "drop":
                return Encoded([], [], DROP_TOO_LONG)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if not _has_target(labels):
                return Encoded([], [], DROP_NO_TRAINED_AFTER_TRUNCATION)
        return Encoded(ids, labels)


def _has_target(labels: Sequence[int]) -> bool:
    # A trained label at position 0 has no preceding token to predict it from, so it does not count.
    return any(label != IGNORE_INDEX for label in labels[1:])


def prompt_encoder(tokenizer: Any):
    """`encode_prompt(messages) -> ids` for a tokenizer whose chat_template is the trained one
    (an exported model folder): prompts are tokenized exactly as training tokenized them."""
    import sys

    from exemplar.data.tokenizer import prepare_tokenizer

    bundle = prepare_tokenizer(tokenizer, None)
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
    return Encoder(tokenizer, masker, max_length=sys.maxsize).encode_prompt
