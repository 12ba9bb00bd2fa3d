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

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from exemplar.data.masking import ChatMasker, Piece
from exemplar.data.schema import IGNORE_INDEX, Conversation, Example, TextDocument, TokenizedExample
from exemplar.errors import TemplateError

# Why an example was not kept. These names appear in reports and `data stats`.
DROP_TOO_LONG = "too_long"
DROP_NO_TRAINED = "no_trained_tokens"
DROP_NO_TRAINED_AFTER_TRUNCATION = "no_trained_tokens_after_truncation"
DROP_TEMPLATE = "template_error"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    drop_reason: str | None = None
    turns_without_stop: int = 0
    detail: str | None = None  # for template errors: the message


class PieceTokenizer:
    """Four views of one tokenizer: {first piece, continuation} x {control tokens, plain text}."""

    def __init__(self, backend: Tokenizer):
        source = backend.to_str()
        self.first = Tokenizer.from_str(source)
        self.first_text = Tokenizer.from_str(source)
        continuation = json.dumps(_without_prefix_space(json.loads(source)))
        self.cont = Tokenizer.from_str(continuation)
        self.cont_text = Tokenizer.from_str(continuation)
        self.first_text.encode_special_tokens = True
        self.cont_text.encode_special_tokens = True

    def encode_rows(self, rows: list[list[Piece]]) -> list[list[list[int]]]:
        """Token ids for each piece of each row, batched per tokenizer view."""
        groups: dict[str, list[tuple[int, int, str]]] = {
            "first": [],
            "first_text": [],
            "cont": [],
            "cont_text": [],
        }
        for r, pieces in enumerate(rows):
            for p, piece in enumerate(pieces):
                view = ("first" if p == 0 else "cont") + ("_text" if piece.content else "")
                groups[view].append((r, p, piece.text))
        out: list[list[list[int]]] = [[[] for _ in pieces] for pieces in rows]
        for view, items in groups.items():
            if not items:
                continue
            encodings = getattr(self, view).encode_batch_fast(
                [t for _, _, t in items], add_special_tokens=False
            )
            for (r, p, _), enc in zip(items, encodings, strict=True):
                out[r][p] = enc.ids
        return out


def _without_prefix_space(node: Any) -> Any:
    """Copy of a tokenizer.json tree with every 'add a leading space' step switched off."""
    if isinstance(node, list):
        return [_without_prefix_space(n) for n in node if not _is_prepend(n)]
    if not isinstance(node, dict):
        return node
    node = {k: _without_prefix_space(v) for k, v in node.items()}
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

    def encode(self, examples: list[Example]) -> list[Encoded]:
        rows: list[list[Piece]] = []
        slots: list[
            tuple[int, int] | Encoded
        ] = []  # per example: (row index, turns_without_stop) or a result
        for ex in examples:
            if isinstance(ex, TokenizedExample):
                labels = ex.labels if ex.labels is not None else list(ex.input_ids)
                slots.append(self.finish(list(ex.input_ids), list(labels)))
            elif isinstance(ex, TextDocument):
                slots.append((len(rows), 0))
                rows.append([Piece(ex.text, content=True, trained=True)])
            elif isinstance(ex, Conversation):
                if self.masker is None:
                    raise TemplateError("conversations need a chat template")
                try:
                    rendered = self.masker.render_pieces(ex)
                except TemplateError as e:
                    slots.append(Encoded([], [], DROP_TEMPLATE, detail=str(e)))
                    continue
                slots.append((len(rows), rendered.turns_without_stop))
                rows.append(rendered.pieces)
            else:
                raise TypeError(f"not an example: {type(ex).__name__}")
        ids = self.pieces.encode_rows(rows)
        results = []
        for ex, slot in zip(examples, slots, strict=True):
            if isinstance(slot, Encoded):
                results.append(slot)
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


def _has_target(labels: list[int]) -> bool:
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
