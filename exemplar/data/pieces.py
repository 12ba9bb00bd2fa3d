"""Tokenizing the pieces of a rendered conversation: four views of one tokenizer.

Every piece is tokenized on its own, so a token never straddles a trained/untrained boundary, and
message content is tokenized with special-token parsing switched off: a user who types
`<|im_end|>` gets plain text tokens, never a forged turn boundary. Pieces after the first are
tokenized as a continuation (no SentencePiece prefix space, no byte-level leading space), so the
ids of a conversation are what a single tokenization of the same text would give wherever the
pieces meet at a token boundary. We work on the `tokenizers` backend through its public JSON
serialisation because transformers offers no per-call switch for either behaviour.
"""

from __future__ import annotations

import itertools
import json
import re
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer, models

from exemplar.data.masking import Piece


class PieceTokenizer:
    """Four views of one tokenizer: {first piece, continuation} x {control tokens, plain text}.

    Template text (everything that is not message content) repeats in every row, so its ids are
    memoized by (view, text); message content is always tokenized. Views are built on first use.
    When the tokenizer's normalizer only replaces and prepends strings (SentencePiece-style
    tokenizers: " " -> "▁") and every added token is special, the plain-text views apply it in
    Python before the call (same text, a fraction of the cost of the Rust normalizer's alignment
    bookkeeping, which we do not use). Such tokenizers have no pre-tokenizer, so their BPE runs
    on whole messages; `BpeWords` splits them where no token can cross and caches words.
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

    def _view(
        self, first: bool, plain_text: bool
    ) -> tuple[Tokenizer, _TextNormalizer | None, BpeWords | None]:
        if first or self._same_views:
            view, tree = Tokenizer.from_str(self._source), self._components
        else:
            view, tree = Tokenizer.from_str(json.dumps(self._cont_tree)), self._cont_tree
        view.no_truncation()  # a tokenizer.json may carry settings meant for whole inputs
        view.no_padding()
        normalize = _TextNormalizer.of(tree) if plain_text else None
        if normalize is not None and normalize.moves_normalizer:
            view.normalizer = None
        if normalize is not None and normalize.moves_pre_tokenizer:
            view.pre_tokenizer = None
        view.encode_special_tokens = plain_text
        words = BpeWords.of(view, normalize) if plain_text else None
        return view, normalize, words

    @cached_property
    def first(self) -> Tokenizer:
        return self._view(True, False)[0]

    @cached_property
    def cont(self) -> Tokenizer:
        return self.first if self._same_views else self._view(False, False)[0]

    @cached_property
    def _first_text(self) -> tuple[Tokenizer, _TextNormalizer | None, BpeWords | None]:
        return self._view(True, True)

    @cached_property
    def _cont_text(self) -> tuple[Tokenizer, _TextNormalizer | None, BpeWords | None]:
        return self._first_text if self._same_views else self._view(False, True)

    @property
    def releases_gil(self) -> bool:
        """Whether content is tokenized in Rust (which runs beside Python threads), not in the
        Python word cache."""
        return self._first_text[2] is None and self._cont_text[2] is None

    def encode_text(self, texts: list[str], first: bool) -> list[list[int]]:
        """Ids of message contents (special-token parsing off), first pieces of a row or not."""
        if not texts:
            return []
        view, normalize, words = self._first_text if first else self._cont_text
        if normalize is not None:
            texts = [normalize(t) for t in texts]
        if words is not None:
            return words.encode(texts)
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


class BpeWords:
    """BPE on whole messages, computed word by word with a cache of words' ids.

    Tokenizers converted from SentencePiece (Llama 2, Mistral, ...) have no pre-tokenizer: the
    BPE model merges over a whole message, which neither parallelises nor caches, so their
    tokenization is the slowest step of data preparation. But a merge only ever builds a
    vocabulary token, so no token can cross a place where two characters meet that no vocabulary
    token contains. When no token has the word delimiter ("▁", or " ") after another character,
    a message cut before every run of delimiters ("a▁▁b" -> "a", "▁▁b") tokenizes, word by word,
    to exactly the ids of the whole message: each word's merges happen as they would in place
    (merge order only matters among pairs of the same word). Words repeat (Zipf), so a bounded
    cache answers most of them and only new words reach the tokenizer. This is the word cache
    every byte-level BPE keeps (GPT-2's `bpe()`, tokenizers' own), made valid for these models.

    Used only when the view runs nothing but the BPE model on the text: no normalizer (left, or
    applied in Python before), no pre-tokenizer, every added token special (plain-text views do
    not split them out), no dropout, merges always applied (`ignore_merges` off) and no subword
    prefix/suffix. Anything else tokenizes whole messages as before.
    """

    LIMIT = 1 << 18  # words kept; the cache starts over when full
    enabled = True  # False: always tokenize whole messages (the benchmark's comparison)

    def __init__(self, view: Tokenizer, delimiter: str):
        self._view = view
        d = re.escape(delimiter)
        self._split = re.compile(f"{d}*[^{d}]+|{d}+").findall
        self._ids: dict[str, list[int]] = {}

    @classmethod
    def of(cls, view: Tokenizer, normalize: _TextNormalizer | None) -> BpeWords | None:
        model = view.model
        if (
            not cls.enabled
            or not isinstance(model, models.BPE)
            or view.normalizer is not None
            or view.pre_tokenizer is not None
        ):
            return None
        if model.dropout or getattr(model, "ignore_merges", False):
            return None
        if model.continuing_subword_prefix or model.end_of_word_suffix:
            return None
        if not all(t.special for t in view.get_added_tokens_decoder().values()):
            return None
        delimiter = normalize.replacement(" ") if normalize is not None else " "
        vocab = view.get_vocab(with_added_tokens=False)
        if len(delimiter) != 1 or delimiter not in vocab:
            return None
        d = re.escape(delimiter)
        crossing = re.compile(f"[^{d}]{d}").search  # a token with the delimiter after another character
        if any(crossing(token) for token in vocab):
            return None
        return cls(view, delimiter)

    def encode(self, texts: list[str]) -> list[list[int]]:
        words = list(map(self._split, texts))
        ids = self._ids
        new = set().union(*words).difference(ids.keys())
        if len(ids) + len(new) > self.LIMIT:
            ids.clear()
            new = set().union(*words)
        if new:
            batch = list(new)
            for word, encoding in zip(
                batch, self._view.encode_batch_fast(batch, add_special_tokens=False), strict=True
            ):
                ids[word] = encoding.ids
        word_ids = ids.__getitem__
        chain = itertools.chain.from_iterable
        return [list(chain(map(word_ids, w))) for w in words]


class _TextNormalizer:
    """The tokenizer's text rewriting, applied in Python: a normalizer made only of string Replace
    and Prepend steps, then (optionally) a Metaspace pre-tokenizer that does not split, which only
    replaces spaces and prepends the replacement (the usual SentencePiece conversions)."""

    def __init__(self, steps: list[tuple[str, str, str]], moves_normalizer: bool, moves_pre_tokenizer: bool):
        # ("replace", old, new) | ("replace_start", old, new) | ("prepend", text, "") | ("prepend_unless", text, "")
        self.steps = steps
        self.moves_normalizer = moves_normalizer
        self.moves_pre_tokenizer = moves_pre_tokenizer

    @classmethod
    def of(cls, tree: dict[str, Any]) -> _TextNormalizer | None:
        """The tree's normalizer (and non-splitting Metaspace), when every step qualifies and
        moving them before the added-token split cannot change anything (every added token is
        special, so plain-text views skip them). None when there is nothing to move."""
        if any(not t.get("special", False) for t in tree.get("added_tokens") or []):
            return None
        node = tree.get("normalizer")
        steps = [] if node is None else _normalizer_steps(node)
        if steps is None:
            return None
        pre = tree.get("pre_tokenizer")
        metaspace = _metaspace_steps(pre) if pre is not None else None
        if node is None and metaspace is None:
            return None
        return cls(steps + (metaspace or []), node is not None, metaspace is not None)

    def replacement(self, text: str) -> str:
        """What the replace steps make of `text` (the prepend steps only act at the start)."""
        for kind, a, b in self.steps:
            if kind == "replace":
                text = text.replace(a, b)
        return text

    def __call__(self, text: str) -> str:
        for kind, a, b in self.steps:
            if kind == "replace":
                text = text.replace(a, b)
            elif kind == "prepend":
                if text:  # tokenizers prepends to non-empty strings only
                    text = a + text
            elif kind == "replace_start":
                if text.startswith(a):
                    text = b + text[len(a) :]
            elif text and not text.startswith(a):  # Metaspace: unless already there
                text = a + text
        return text


def _normalizer_steps(node: dict[str, Any]) -> list[tuple[str, str, str]] | None:
    """A normalizer's string Replace / Prepend steps; None if it has any other kind."""
    nodes = node.get("normalizers", []) if node.get("type") == "Sequence" else [node]
    steps = []
    for n in nodes:
        pattern = n.get("pattern") or {}
        if n.get("type") == "Replace" and set(pattern) == {"String"} and isinstance(n.get("content"), str):
            if not pattern["String"]:
                return None
            steps.append(("replace", pattern["String"], n["content"]))
        elif n.get("type") == "Prepend" and isinstance(n.get("prepend"), str):
            steps.append(("prepend", n["prepend"], ""))
        elif (literal := _start_literal(n)) is not None:
            steps.append(("replace_start", literal, n["content"]))
        else:
            return None
    return steps


def _start_literal(node: dict[str, Any]) -> str | None:
    """The literal of a Replace whose regex is `\\A` + plain text (rewrite the text's start), e.g.
    the `\\A▁ -> ▁▁` step of newer SentencePiece conversions (Llama 2 in transformers >= 5.24,
    which keeps a typed leading space as its own token); None for any other node. Only this shape
    is moved to Python: general regexes follow Oniguruma's rules, not Python's."""
    pattern = node.get("pattern") or {}
    regex = pattern.get("Regex") if node.get("type") == "Replace" and set(pattern) == {"Regex"} else None
    if not isinstance(regex, str) or not isinstance(node.get("content"), str) or not regex.startswith("\\A"):
        return None
    literal = regex[2:]
    return literal if literal and re.escape(literal) == literal else None


def _metaspace_steps(node: dict[str, Any]) -> list[tuple[str, str, str]] | None:
    """A Metaspace pre-tokenizer that does not split, as text steps; None for anything else.

    It replaces " " with its replacement and, with prepend scheme "always" or "first", prepends
    the replacement unless the text starts with it ("first" means the first section of the
    input: plain-text views never cut the text at added tokens, so there is one section)."""
    if node.get("type") == "Sequence":  # transformers >= 5.24 wraps the one Metaspace in a Sequence
        inner = node.get("pretokenizers") or []
        return _metaspace_steps(inner[0]) if len(inner) == 1 else None
    replacement = node.get("replacement")
    if node.get("type") != "Metaspace" or node.get("split", True) or not isinstance(replacement, str):
        return None
    scheme = node.get("prepend_scheme")
    if scheme not in ("always", "first", "never"):
        return None
    steps = [("replace", " ", replacement)]
    if scheme != "never":
        steps.append(("prepend_unless", replacement, ""))
    return steps


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
    """A step that only acts at the start of the text: a Prepend, or a Replace anchored at `\\A`
    (continuation pieces are mid-text, where neither applies)."""
    if not isinstance(node, dict):
        return False
    pattern = node.get("pattern")
    anchored = isinstance(pattern, dict) and str(pattern.get("Regex", "")).startswith("\\A")
    return node.get("type") == "Prepend" or (node.get("type") == "Replace" and anchored)
