"""Turn canonical examples into `input_ids` and `labels`, in batches.

Each rendered conversation arrives as pieces (see `masking.py`). Every piece is tokenized on
its own, so a token never straddles a trained/untrained boundary, and message content is
tokenized with special-token parsing switched off: a user who types `<|im_end|>` gets plain
text tokens, never a forged turn boundary. Pieces after the first are tokenized as a
continuation (no SentencePiece prefix space, no byte-level leading space), so the ids of a
conversation are what a single tokenization of the same text would give wherever the pieces
meet at a token boundary. We work on the `tokenizers` backend through its public JSON
serialisation because transformers offers no per-call switch for either behaviour.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from exemplar.data.masking import ChatMasker, Piece
from exemplar.data.schema import IGNORE_INDEX, Conversation, Example, TextDocument, TokenizedExample
from exemplar.errors import TemplateError

# Why an example was not kept. These names appear in reports and `data stats`.
DROP_TOO_LONG = "too_long"
DROP_NO_TRAINED = "no_trained_tokens"
DROP_NO_TRAINED_AFTER_TRUNCATION = "no_trained_tokens_after_truncation"
DROP_TEMPLATE = "template_error"

# Examples per tokenizer call: large batches keep the tokenizer's threads busy.
ENCODE_BATCH = 2048


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    drop_reason: str | None = None
    turns_without_stop: int = 0
    detail: str | None = None  # for template errors: the message


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
        )


class PieceTokenizer:
    """Four views of one tokenizer: {first piece, continuation} x {control tokens, plain text}.

    Template text (everything that is not message content) repeats in every row, so its ids are
    memoized by (view, text); message content is always tokenized. Views are built on first use.
    When the tokenizer's normalizer only replaces and prepends strings (SentencePiece-style
    tokenizers: " " -> "▁") and every added token is special, the plain-text views apply it in
    Python before the call (same text, a fraction of the cost of the Rust normalizer's alignment
    bookkeeping, which we do not use).
    """

    MEMO_LIMIT = 65536

    def __init__(self, backend: Tokenizer):
        self._source = backend.to_str()
        self._components = _components(backend)
        self._memo: dict[tuple[bool, str], list[int]] = {}

    @cached_property
    def _same_views(self) -> bool:
        """No prefix-space step to switch off: continuation views are the first-piece views."""
        return _without_prefix_space(self._components) == self._components

    @cached_property
    def _cont_tree(self) -> dict[str, Any]:
        return _without_prefix_space(json.loads(self._source))  # only when the views differ

    def _view(self, first: bool, plain_text: bool) -> tuple[Tokenizer, _TextNormalizer | None]:
        if first or self._same_views:
            view, tree = Tokenizer.from_str(self._source), self._components
        else:
            view, tree = Tokenizer.from_str(json.dumps(self._cont_tree)), self._cont_tree
        normalize = _TextNormalizer.of(tree) if plain_text else None
        if normalize is not None:
            view.normalizer = None
        view.encode_special_tokens = plain_text
        return view, normalize

    @cached_property
    def first(self) -> Tokenizer:
        return self._view(True, False)[0]

    @cached_property
    def cont(self) -> Tokenizer:
        return self.first if self._same_views else self._view(False, False)[0]

    @cached_property
    def _first_text(self) -> tuple[Tokenizer, _TextNormalizer | None]:
        return self._view(True, True)

    @cached_property
    def _cont_text(self) -> tuple[Tokenizer, _TextNormalizer | None]:
        return self._first_text if self._same_views else self._view(False, True)

    def encode_text(self, texts: list[str], first: bool) -> list[list[int]]:
        """Ids of message contents (special-token parsing off), first pieces of a row or not."""
        if not texts:
            return []
        view, normalize = self._first_text if first else self._cont_text
        if normalize is not None:
            texts = [normalize(t) for t in texts]
        return [e.ids for e in view.encode_batch_fast(texts, add_special_tokens=False)]

    def template_ids(self, text: str, first: bool) -> list[int]:
        """Ids of a piece of template text (special tokens parsed), memoized."""
        key = (first, text)
        ids = self._memo.get(key)
        if ids is None:
            view = self.first if first else self.cont
            ids = view.encode(text, add_special_tokens=False).ids
            if len(self._memo) >= self.MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = ids
        return ids

    def content_ids(self, first: list[str], cont: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Ids of message contents (special-token parsing off): first pieces of a row, and the others."""
        return self.encode_text(first, True), self.encode_text(cont, False)

    def encode_rows(self, rows: list[list[Piece]]) -> list[list[list[int]]]:
        """Token ids for each piece of each row."""
        plan, first, cont = self.plan(rows)
        return self.resolve(plan, *self.content_ids(first, cont))

    def plan(self, rows: list[list[Piece]]) -> tuple[list[list[Any]], list[str], list[str]]:
        """Template pieces resolved now (memo); content pieces queued for one batched call per view.

        Returns, per row, a list whose items are id lists (template pieces) or (first, index) slots
        into the queued texts (content pieces), and the two queues.
        """
        first: list[str] = []
        cont: list[str] = []
        plan = []
        for pieces in rows:
            items: list[Any] = []
            for p, piece in enumerate(pieces):
                if piece.content:
                    queue = first if p == 0 else cont
                    items.append((queue is first, len(queue)))
                    queue.append(piece.text)
                else:
                    items.append(self.template_ids(piece.text, p == 0))
            plan.append(items)
        return plan, first, cont

    @staticmethod
    def resolve(
        plan: list[list[Any]], first_ids: list[list[int]], cont_ids: list[list[int]]
    ) -> list[list[list[int]]]:
        return [
            [
                (first_ids if item[0] else cont_ids)[item[1]] if isinstance(item, tuple) else item
                for item in items
            ]
            for items in plan
        ]


class _TextNormalizer:
    """A tokenizer normalizer made only of string Replace and Prepend steps, applied in Python."""

    def __init__(self, steps: list[tuple[str, str, str]]):
        self.steps = steps  # ("replace", old, new) | ("prepend", text, "")

    @classmethod
    def of(cls, tree: dict[str, Any]) -> _TextNormalizer | None:
        """The tree's normalizer, when it qualifies and moving it before the added-token split
        cannot change anything (every added token is special, so plain-text views skip them)."""
        if any(not t.get("special", False) for t in tree.get("added_tokens") or []):
            return None
        node = tree.get("normalizer")
        if node is None:
            return None  # nothing to move
        nodes = node.get("normalizers", []) if node.get("type") == "Sequence" else [node]
        steps = []
        for n in nodes:
            pattern = n.get("pattern") or {}
            if (
                n.get("type") == "Replace"
                and set(pattern) == {"String"}
                and isinstance(n.get("content"), str)
            ):
                if not pattern["String"]:
                    return None
                steps.append(("replace", pattern["String"], n["content"]))
            elif n.get("type") == "Prepend" and isinstance(n.get("prepend"), str):
                steps.append(("prepend", n["prepend"], ""))
            else:
                return None
        return cls(steps)

    def __call__(self, text: str) -> str:
        for kind, a, b in self.steps:
            if kind == "replace":
                text = text.replace(a, b)
            elif text:  # tokenizers prepends to non-empty strings only
                text = a + text
        return text


# Parts of tokenizer.json that hold no normalizer / pre-tokenizer steps (and are large): not walked.
_OPAQUE_KEYS = frozenset({"model", "added_tokens", "vocab", "merges"})


def _components(backend: Tokenizer) -> dict[str, Any]:
    """The parts of tokenizer.json that the views change or inspect, without parsing the whole
    file (vocabulary and merges): normalizer, pre-tokenizer, post-processor, decoder, added tokens."""

    def state(component: Any) -> Any:
        return None if component is None else json.loads(component.__getstate__())

    return {
        "normalizer": state(backend.normalizer),
        "pre_tokenizer": state(backend.pre_tokenizer),
        "post_processor": state(backend.post_processor),
        "decoder": state(backend.decoder),
        "added_tokens": [
            {"content": t.content, "special": t.special} for t in backend.get_added_tokens_decoder().values()
        ],
    }


def _without_prefix_space(node: Any) -> Any:
    """Copy of a tokenizer.json tree with every 'add a leading space' step switched off."""
    if isinstance(node, list):
        return [_without_prefix_space(n) for n in node if not _is_prepend(n)]
    if not isinstance(node, dict):
        return node
    node = {k: v if k in _OPAQUE_KEYS else _without_prefix_space(v) for k, v in node.items()}
    kind = node.get("type")
    if kind == "Metaspace":
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
    elif kind == "ByteLevel" and "add_prefix_space" in node:
        node["add_prefix_space"] = False
    for key in ("normalizer", "pre_tokenizer"):
        if _is_prepend(node.get(key)):
            node[key] = None
    return node


def _is_prepend(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend"


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

    # -- one batch: render, then tokenize ---------------------------------------------------

    def _render(self, examples: Sequence[Example]) -> tuple[list[Any], list[list[Piece]], Any]:
        """Render every example into pieces. Returns per-example slots, the rows of pieces, and
        the tokenizer plan (template ids resolved, content queued)."""
        rows: list[list[Piece]] = []
        slots: list[Any] = []  # per example: (row index, turns_without_stop) or a finished Encoded
        for ex in examples:
            if isinstance(ex, Conversation):
                if self.masker is None:
                    raise TemplateError("conversations need a chat template")
                try:
                    rendered = self.masker.render_pieces(ex)
                except TemplateError as e:
                    slots.append(Encoded([], [], DROP_TEMPLATE, detail=str(e)))
                    continue
                slots.append((len(rows), rendered.turns_without_stop))
                rows.append(rendered.pieces)
            elif isinstance(ex, TextDocument):
                slots.append((len(rows), 0))
                rows.append([Piece(ex.text, content=True, trained=True)])
            elif isinstance(ex, TokenizedExample):
                labels = ex.labels if ex.labels is not None else list(ex.input_ids)
                slots.append(Encoded(list(ex.input_ids), list(labels)))
            else:
                raise TypeError(f"not an example: {type(ex).__name__}")
        return slots, rows, self.pieces.plan(rows)

    def _batches(
        self, examples: Iterable[Example]
    ) -> Iterator[tuple[Sequence[Example], list[Any], list[list[Piece]], list[list[list[int]]]]]:
        """(examples, slots, rows, piece ids) per batch of ENCODE_BATCH examples. The tokenizer
        (which releases the GIL and runs on every core) works on one batch while Python reads,
        converts and renders the next (`examples` may be a lazy iterator)."""
        source = iter(examples)
        chunks = iter(lambda: list(itertools.islice(source, ENCODE_BATCH)), [])
        first = next(chunks, None)
        if first is None:
            return
        second = next(chunks, None)
        if second is None:  # one batch: nothing to overlap
            slots, rows, (plan, first_texts, cont_texts) = self._render(first)
            yield (
                first,
                slots,
                rows,
                self.pieces.resolve(plan, *self.pieces.content_ids(first_texts, cont_texts)),
            )
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for chunk in itertools.chain((first, second), chunks):
                slots, rows, (plan, first_texts, cont_texts) = self._render(chunk)
                job = (
                    chunk,
                    slots,
                    rows,
                    plan,
                    pool.submit(self.pieces.content_ids, first_texts, cont_texts),
                )
                if pending is not None:
                    yield self._finish_batch(pending)
                pending = job
            yield self._finish_batch(pending)

    def _finish_batch(self, job):
        chunk, slots, rows, plan, future = job
        return chunk, slots, rows, self.pieces.resolve(plan, *future.result())

    # -- public -----------------------------------------------------------------------------

    def encode(self, examples: list[Example]) -> list[Encoded]:
        results = []
        for chunk, slots, rows, ids in self._batches(examples):
            for ex, slot in zip(chunk, slots, strict=True):
                if isinstance(slot, Encoded):
                    results.append(slot if slot.drop_reason else self.finish(slot.input_ids, slot.labels))
                    continue
                row, no_stop = slot
                input_ids, labels = [], []
                for piece, piece_ids in zip(rows[row], ids[row], strict=True):
                    input_ids += piece_ids
                    labels += piece_ids if piece.trained else [IGNORE_INDEX] * len(piece_ids)
                if isinstance(ex, TextDocument):
                    input_ids, labels = self._document_ends(input_ids, labels)
                result = self.finish(input_ids, labels)
                result.turns_without_stop = no_stop
                results.append(result)
        return results

    def encode_columns(
        self, examples: Iterable[Example], on_batch: Callable[[int], Any] | None = None
    ) -> EncodedColumns:
        """Like `encode`, straight into flat int32 columns (no per-example lists kept).

        Each batch's pieces are flattened into one array, and the labels, lengths, drops and
        truncation are computed with array operations. `on_batch(n)` is called after each batch
        of n examples (a progress bar's update)."""
        ids_parts, labels_parts, lengths_parts, kept_parts = [], [], [], []
        reasons: list[str | None] = []
        details: dict[int, str] = {}
        no_stop_total = 0
        base = 0
        for chunk, slots, rows, ids in self._batches(examples):
            flat: list[Sequence[int]] = []  # every piece of every example, in order
            trained: list[bool] = []  # per piece: labels = ids (True) or IGNORE_INDEX (False)
            explicit: dict[int, Sequence[int]] = {}  # piece index -> its labels (pre-tokenized rows)
            counts: list[int] = []  # pieces per example
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
                row, no_stop = slot
                no_stop_total += no_stop  # counted for every rendered conversation, kept or not
                document = isinstance(ex, TextDocument)
                if document and self.adds_bos:
                    flat.append((self.bos_id,))
                    trained.append(False)
                flat.extend(ids[row])
                trained.extend(piece.trained for piece in rows[row])
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
        )

    def _columns(self, flat, trained, explicit, counts, slots):
        """One batch: (ids, labels, kept lengths, kept example indices, drop reason per example)."""
        piece_lengths = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
        total = int(piece_lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int32, count=total)
        flags = np.asarray(trained, dtype=bool)
        labels = np.where(np.repeat(flags, piece_lengths), ids, np.int32(IGNORE_INDEX)).astype(
            np.int32, copy=False
        )
        piece_trained = np.where(flags, piece_lengths, 0)  # trained tokens per piece
        if explicit:  # pre-tokenized examples bring their own labels
            piece_starts = np.cumsum(piece_lengths) - piece_lengths
            for p, piece_labels in explicit.items():
                start = int(piece_starts[p])
                labels[start : start + len(piece_labels)] = piece_labels
                piece_trained[p] = int(
                    np.count_nonzero(labels[start : start + len(piece_labels)] != IGNORE_INDEX)
                )
        # Per example (prefix sums over pieces: empty examples need no special case).
        piece_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.asarray(counts, dtype=np.int64))])
        token_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(piece_lengths)])[piece_bounds]
        trained_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(piece_trained)])[piece_bounds]
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
                reasons.append(DROP_NO_TRAINED)
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
        header, tokenized piece by piece exactly as the same text is tokenized in training."""
        if self.masker is None:
            raise TemplateError("prompts need a chat template")
        pieces = self.masker.prompt_pieces(messages, tools)
        return [token for piece_ids in self.pieces.encode_rows([pieces])[0] for token in piece_ids]

    def _document_ends(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Plain text gets the tokenizer's BOS (if it normally adds one) and a trained EOS."""
        if self.adds_bos:
            ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
        if self.eos_id is not None:
            ids, labels = [*ids, self.eos_id], [*labels, self.eos_id]
        return ids, labels

    def finish(self, ids: list[int], labels: list[int]) -> Encoded:
        """Apply the length policy; drop examples left with nothing to train."""
        if not _has_target(labels):
            return Encoded([], [], DROP_NO_TRAINED)
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
