"""Tokenizing rendered conversations exactly as the inference stack does.

`tokenizer.apply_chat_template(conv, tokenize=True)` (transformers, vLLM, TRL) tokenizes the
rendered text in one call: the tokenizer first cuts it at its added tokens, then normalizes,
pre-tokenizes and BPE-encodes each section between them on its own. A SentencePiece "always"
prefix, a `Prepend` normalizer, a `\\A` rewrite or a byte-level prefix space applies to every
section; a Metaspace "first" prefix only to the section at the start of the text. We build the
same sections from the rendered text, with one difference: the text is cut only at special tokens
that the template wrote, never at special-token strings inside message content (a user who types
`<|im_end|>` gets plain text tokens, never a forged turn boundary). Each section is then tokenized
with special-token parsing off, so within a section tokens may straddle template text and content
(`User: What` -> `▁What`), exactly as at inference. A token is trained when its characters
overlap a trained region (see masking.py): a token holding the first characters of the response
is what the model must generate.

Sections with no message content (template text between two special tokens) repeat in every row
and are memoized; sections with content are tokenized in one batched call per view. We work on
the `tokenizers` backend through its public JSON serialisation because transformers offers no
per-call switch for special-token parsing or the "first" prefix.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer, models

from exemplar.data.masking import Piece

# A row's tokens, in chunks: (ids, trained) where trained is one flag for the whole chunk or one
# flag per token (a section where trained and untrained text meet).
Chunk = tuple[list[int], "bool | list[bool]"]
Segment = tuple[str, bool, bool]  # (text, message content?, trained?) within one section
Span = tuple[int, int]


class PieceTokenizer:
    """Rows of pieces (masking.py) -> token ids and trained flags, section by section.

    Two plain-text views of one tokenizer (special-token parsing off): for the section at the
    start of the text, and for later sections (which differ only when a Metaspace prefix is
    "first"). When the tokenizer's normalizer only replaces characters and prepends strings
    (SentencePiece conversions: " " -> "▁") and every added token is special, the views apply it
    in Python before the call (same text, a fraction of the cost of the Rust normalizer's
    alignment bookkeeping); such tokenizers have no pre-tokenizer, so their BPE runs on whole
    sections, which `BpeWords` splits where no token can cross and caches word by word.
    """

    MEMO_LIMIT = 65536

    def __init__(self, backend: Tokenizer):
        self._source = backend.to_str()
        self._components = _components(backend)
        self._memo: dict[tuple[bool, tuple[Segment, ...]], Chunk] = {}
        self._splits: dict[str, list[str | int]] = {}  # template text -> its text and special ids
        added = backend.get_added_tokens_decoder()
        special = sorted((t for t in added.values() if t.special), key=lambda t: len(t.content), reverse=True)
        self._special_ids = {t.content: backend.token_to_id(t.content) for t in special}
        # The added-token split of the tokenizer (leftmost-longest match). Only special tokens: the
        # plain-text views split at the others themselves, as inference does.
        patterns = [re.escape(t.content) for t in special if t.content]
        self._find_special = re.compile("|".join(patterns)).finditer if patterns else None
        # Tokens that take the whitespace before (lstrip) or after (rstrip) them, as Phi-3's do.
        self._lstrip = {self._special_ids[t.content] for t in special if t.lstrip}
        self._rstrip = {self._special_ids[t.content] for t in special if t.rstrip}

    # -- views -------------------------------------------------------------------------------

    @cached_property
    def _same_views(self) -> bool:
        """No "first"-only prefix: later sections are tokenized like the first one."""
        return _later_sections(self._components) == self._components

    def _view(self, first: bool) -> tuple[Tokenizer, _TextNormalizer | None, BpeWords | None]:
        if first or self._same_views:
            view, tree = Tokenizer.from_str(self._source), self._components
        else:
            tree = _later_sections(json.loads(self._source))
            view = Tokenizer.from_str(json.dumps(tree))
        view.no_truncation()  # a tokenizer.json may carry settings meant for whole inputs
        view.no_padding()
        view.post_processor = None  # adds nothing without special tokens; would trim offsets
        normalize = _TextNormalizer.of(tree)
        if normalize is not None and normalize.moves_normalizer:
            view.normalizer = None
        if normalize is not None and normalize.moves_pre_tokenizer:
            view.pre_tokenizer = None
        view.encode_special_tokens = True
        return view, normalize, BpeWords.of(view, normalize)

    @cached_property
    def _first_text(self) -> tuple[Tokenizer, _TextNormalizer | None, BpeWords | None]:
        return self._view(True)

    @cached_property
    def _later_text(self) -> tuple[Tokenizer, _TextNormalizer | None, BpeWords | None]:
        return self._first_text if self._same_views else self._view(False)

    @property
    def releases_gil(self) -> bool:
        """Whether content is tokenized in Rust (which runs beside Python threads), not in the
        Python word cache."""
        return self._first_text[2] is None and self._later_text[2] is None

    # -- plain text --------------------------------------------------------------------------

    def encode_text(self, texts: list[str], first: bool) -> list[list[int]]:
        """Ids of sections of text (special-token parsing off): at the start of the text or not."""
        if not texts:
            return []
        view, normalize, words = self._first_text if first else self._later_text
        if normalize is not None:
            texts = [normalize(t) for t in texts]
        if words is not None:
            return words.encode(texts)
        return [e.ids for e in view.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_located(self, texts: list[str], first: bool) -> list[tuple[list[int], list[int], list[int]]]:
        """Like `encode_text`, with each token's start and end (characters of the given text)."""
        if not texts:
            return []
        view, normalize, words = self._first_text if first else self._later_text
        normalized = [normalize(t) for t in texts] if normalize is not None else texts
        if words is not None:
            found = words.encode_located(normalized)
        else:
            found = [
                (e.ids, [s for s, _ in e.offsets], [t for _, t in e.offsets])
                for e in view.encode_batch(normalized, add_special_tokens=False)
            ]
        if normalize is None:
            return found
        # The Python steps only insert text at the start and replace characters one for one, so
        # a normalized position is the original one moved by what was inserted; inserted text
        # belongs to the first character, as the Rust normalizer aligns it.
        out = []
        for text, norm, (ids, starts, ends) in zip(texts, normalized, found, strict=True):
            shift, floor = len(norm) - len(text), min(1, len(text))
            if shift:
                starts = [max(0, s - shift) for s in starts]
                ends = [max(e - shift, floor) for e in ends]
            out.append((ids, starts, ends))
        return out

    # -- rows --------------------------------------------------------------------------------

    def encode_rows(self, rows: list[list[Piece]]) -> list[list[Chunk]]:
        """Token ids and trained flags of each row, in chunks."""
        plan, queues = self.plan(rows)
        return self.resolve(plan, self.content_ids(queues))

    def plan(self, rows: list[list[Piece]]) -> tuple[list[list[Any]], dict[tuple[bool, bool], list]]:
        """Sections without content resolved now (memo); sections with content queued for one
        batched call per (view, whether trained and untrained text meet in it).

        Returns, per row, a list whose items are chunks or (queue key, index, trained) slots, and
        the queues: texts (uniform sections) or (text, trained spans, prefix ids) (mixed ones;
        prefix ids: those of the untrained template text that opens a section whose rest is
        trained, the usual shape of an assistant turn, else None).
        """
        queues: dict[tuple[bool, bool], list] = {(f, m): [] for f in (True, False) for m in (True, False)}
        plan = []
        for pieces in rows:
            items: list[Any] = []
            for section in self._sections(pieces):
                if not isinstance(section[1], list):  # a special token
                    items.append(([section[0]], section[1]))
                    continue
                first, segments = section
                if not any(content for _, content, _ in segments):
                    items.append(self._template_section(first, segments))
                    continue
                flags = {trained for _, _, trained in segments}
                text = "".join(t for t, _, _ in segments)
                if len(flags) == 1:
                    queue = queues[(first, False)]
                    items.append(((first, False), len(queue), flags.pop()))
                    queue.append(text)
                else:
                    queue = queues[(first, True)]
                    items.append(((first, True), len(queue), None))
                    queue.append((text, _trained_spans(segments), self._prefix_ids(first, segments)))
            plan.append(items)
        return plan, queues

    def content_ids(self, queues: dict[tuple[bool, bool], list]) -> dict[tuple[bool, bool], list]:
        """Tokenize the queued sections: ids (uniform), or a list of chunks (mixed).

        A mixed section whose ids begin with the ids of its untrained prefix alone is cut there:
        those tokens spell exactly the prefix, so none of them holds trained text and the next one
        starts the response. The others (a token straddles the boundary, or trained and untrained
        text alternate) are labelled from each token's offsets.
        """
        done: dict[tuple[bool, bool], list] = {}
        for (first, mixed), queue in queues.items():
            if not mixed:
                done[(first, mixed)] = self.encode_text(queue, first)
                continue
            results: list[Any] = []
            straddling: list[int] = []
            for k, ids in enumerate(self.encode_text([text for text, _, _ in queue], first)):
                prefix = queue[k][2]
                if prefix is not None and ids[: len(prefix)] == prefix:
                    results.append([(ids[: len(prefix)], False), (ids[len(prefix) :], True)])
                else:
                    results.append(None)
                    straddling.append(k)
            located = self.encode_located([queue[k][0] for k in straddling], first)
            for k, (ids, starts, ends) in zip(straddling, located, strict=True):
                results[k] = [(ids, _flags(starts, ends, queue[k][1]))]
            done[(first, mixed)] = results
        return done

    @staticmethod
    def resolve(plan: list[list[Any]], done: dict[tuple[bool, bool], list]) -> list[list[Chunk]]:
        rows = []
        for items in plan:
            chunks = []
            for item in items:
                if len(item) == 3:
                    result = done[item[0]][item[1]]
                    if item[2] is None:
                        chunks += result
                    else:
                        chunks.append((result, item[2]))
                else:
                    chunks.append(item)
            rows.append(chunks)
        return rows

    @cached_property
    def _prefix_cut(self) -> bool:
        """Whether a prefix tokenized alone is normalized as at the start of a longer text: not
        with a normalizer that strips the end of its text."""
        return '"Strip"' not in json.dumps(self._components["normalizer"])

    def _prefix_ids(self, first: bool, segments: list[Segment]) -> list[int] | None:
        """Ids of the untrained template text that opens the section, when all after it is trained."""
        if not self._prefix_cut:
            return None
        k = next(i for i, (_, _, trained) in enumerate(segments) if trained)
        if any(content for _, content, _ in segments[:k]) or not all(t for _, _, t in segments[k:]):
            return None
        return self._template_section(first, segments[:k])[0]

    def _template_section(self, first: bool, segments: list[Segment]) -> Chunk:
        """A section of template text only: the same in every row of a template, memoized."""
        key = (first, tuple(segments))
        found = self._memo.get(key)
        if found is None:
            flags = {trained for _, _, trained in segments}
            text = "".join(t for t, _, _ in segments)
            if len(flags) == 1:
                found = (self.encode_text([text], first)[0], flags.pop())
            else:
                ids, starts, ends = self.encode_located([text], first)[0]
                found = (ids, _flags(starts, ends, _trained_spans(segments)))
            if len(self._memo) >= self.MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = found
        return found

    def _sections(self, pieces: list[Piece]) -> list[Any]:
        """The row cut where the template wrote special tokens: (id, trained) for each special
        token, and (first, segments) for each non-empty section between them (`first`: it starts
        the text). The whitespace beside an lstrip/rstrip token goes into the token, message
        content's too, as the tokenizer's split does."""
        out: list[Any] = []
        segments: list[Segment] = []
        at_start = True
        eat = False  # after an rstrip token: template whitespace that follows is the token's
        for piece in pieces:
            if piece.content:
                text = piece.text.lstrip() if eat else piece.text
                eat = eat and not text
                if text:
                    segments.append((text, True, piece.trained))
                continue
            for part in self._split(piece.text):
                if isinstance(part, str):
                    if eat:
                        part = part.lstrip()
                        eat = not part
                    if part:
                        segments.append((part, False, piece.trained))
                    continue
                if part in self._lstrip:
                    _strip_end(segments)
                if segments:
                    out.append((at_start, segments))
                    segments = []
                out.append((part, piece.trained))
                at_start = False
                eat = part in self._rstrip
        if segments:
            out.append((at_start, segments))
        return out

    def _split(self, text: str) -> list[str | int]:
        """Template text as its text parts and the ids of the special tokens in it (cached)."""
        found = self._splits.get(text)
        if found is None:
            found, at = [], 0
            for match in self._find_special(text) if self._find_special else ():
                if match.start() > at:
                    found.append(text[at : match.start()])
                found.append(self._special_ids[match.group()])
                at = match.end()
            if at < len(text):
                found.append(text[at:])
            if len(self._splits) >= self.MEMO_LIMIT:
                self._splits.clear()
            self._splits[text] = found
        return found


def _strip_end(segments: list[Segment]) -> None:
    """Drop the whitespace that ends the section (an lstrip token takes it)."""
    while segments:
        text, content, trained = segments.pop()
        text = text.rstrip()
        if text:
            segments.append((text, content, trained))
            return


def _trained_spans(segments: list[Segment]) -> list[Span]:
    spans: list[Span] = []
    at = 0
    for text, _, trained in segments:
        if trained and text:
            if spans and spans[-1][1] == at:
                spans[-1] = (spans[-1][0], at + len(text))
            else:
                spans.append((at, at + len(text)))
        at += len(text)
    return spans


def _flags(starts: list[int], ends: list[int], spans: list[Span]) -> list[bool]:
    """Per token: does it overlap a trained span? (Token starts and ends never decrease.)"""
    flags = [False] * len(starts)
    for a, b in spans:
        lo = bisect.bisect_right(ends, a)  # tokens that end at or before a are before the span
        hi = bisect.bisect_left(starts, b)  # tokens that start before b reach into it
        flags[lo:hi] = [True] * max(0, hi - lo)
    return flags


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
        self._located: dict[str, tuple[list[int], list[int], list[int]]] = {}

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

    def encode_located(self, texts: list[str]) -> list[tuple[list[int], list[int], list[int]]]:
        """Like `encode`, with each token's start and end in its text (from a cache of words'
        tokens and offsets, kept apart from the ids-only cache, which needs less memory)."""
        words = list(map(self._split, texts))
        located = self._located
        new = set().union(*words).difference(located.keys())
        if len(located) + len(new) > self.LIMIT:
            located.clear()
            new = set().union(*words)
        if new:
            batch = list(new)
            for word, e in zip(batch, self._view.encode_batch(batch, add_special_tokens=False), strict=True):
                located[word] = (e.ids, [s for s, _ in e.offsets], [t for _, t in e.offsets])
        out = []
        for text_words in words:
            ids: list[int] = []
            starts: list[int] = []
            ends: list[int] = []
            at = 0
            for word in text_words:
                word_ids, word_starts, word_ends = located[word]
                ids += word_ids
                starts += [s + at for s in word_starts]
                ends += [e + at for e in word_ends]
                at += len(word)
            out.append((ids, starts, ends))
        return out


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
        steps += metaspace or []
        if any(kind == "replace" and (len(a), len(b)) != (1, 1) for kind, a, b in steps):
            return None  # only one-for-one replacements keep offsets simple (see encode_located)
        return cls(steps, node is not None, metaspace is not None)

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
    the replacement unless the text starts with it ("first": the view for the section at the
    start of the text; the view for later sections has the scheme "never", see `_later_sections`)."""
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


def _later_sections(node: Any) -> Any:
    """Copy of a tokenizer.json tree as it treats a section that does not start the text: a
    Metaspace prefix with scheme "first" is not added there (every other step applies to each
    section alike)."""
    if isinstance(node, list):
        return [_later_sections(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: v if k in _OPAQUE_KEYS else _later_sections(v) for k, v in node.items()}
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
        node["prepend_scheme"] = "never"
    return node
