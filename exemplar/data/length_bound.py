"""A lower bound on an example's token count from its text alone, to drop a huge row as too long
without tokenizing it (a 50 MB row would otherwise need gigabytes of tokenizer memory).

The bound: every token covers at most B bytes of the rendered text, where B is the longest
token of the vocabulary (added tokens included) in UTF-8 bytes. A byte-level token's string
spells one character per byte it covers, a SentencePiece token's `▁` (3 bytes) stands for one
space and a byte-fallback token `<0x41>` (6 bytes) for one byte, so B never undercounts. Hence a
text of N bytes needs at least N / B tokens. Whitespace is left out of N: a special token with
`lstrip`/`rstrip` swallows the whitespace beside it, and some pre-tokenizers drop whitespace.

It holds only when no text can vanish or shrink on the way, so it is used only for tokenizers
that can encode every byte (a byte-level alphabet, or BPE with byte fallback: no `<unk>` that
covers an unknown run of any length), whose normalizer only prepends or replaces (never with
fewer non-space bytes; `Lowercase` and the Unicode forms can shrink text) and whose
pre-tokenizer removes nothing but whitespace. For other tokenizers the bound is 0 (never used).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

# Characters Python's str.isspace() accepts: a superset of what tokenizers treats as whitespace,
# so leaving all of them out only lowers the bound.
_SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_KEEPS_TEXT_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
_KEEPS_TEXT_PRE_TOKENIZERS |= {"Digits", "UnicodeScripts"}


def non_space_bytes(text: str) -> int:
    """UTF-8 bytes of `text` outside whitespace, without copying the text more than once."""
    total = len(text.encode("utf-8"))
    return total - sum(len(c.encode("utf-8")) * text.count(c) for c in _SPACES)


class TokenLowerBound:
    """`exceeds(texts, limit)`: whether the texts surely need more than `limit` tokens."""

    def __init__(self, backend: Any):
        spec = json.loads(backend.to_str())
        self.max_token_bytes = self._max_token_bytes(backend, spec)

    def exceeds(self, texts: Sequence[str], limit: int) -> bool:
        if self.max_token_bytes is None:
            return False
        # A character is at most 4 bytes: most rows are too short to need the exact count.
        if 4 * sum(map(len, texts)) <= self.max_token_bytes * limit:
            return False
        return self.min_tokens(texts) > limit

    def covering_prefix(self, texts: Sequence[str], limit: int) -> tuple[int, int] | None:
        """A prefix of the concatenated texts that surely needs more than `limit` tokens, as
        (k, c): texts[:k] whole and the first c characters of texts[k]. None when the texts
        together may not (or the bound does not apply to the tokenizer)."""
        if self.max_token_bytes is None or 4 * sum(map(len, texts)) <= self.max_token_bytes * limit:
            return None
        need = self.max_token_bytes * limit + 1  # ceil(n / B) > limit exactly when n > B * limit
        covered = 0
        for k, text in enumerate(texts):
            here = non_space_bytes(text)
            if covered + here >= need:
                return k, _chars_covering(text, need - covered)
            covered += here
        return None

    def min_tokens(self, texts: Iterable[str]) -> int:
        """At least this many tokens (0 when the bound does not apply to the tokenizer)."""
        if self.max_token_bytes is None:
            return 0
        covered = sum(non_space_bytes(t) for t in texts)
        return -(-covered // self.max_token_bytes)

    @staticmethod
    def _max_token_bytes(backend: Any, spec: dict[str, Any]) -> int | None:
        if not (_keeps_text(spec.get("normalizer")) and _pre_tokenizer_keeps_text(spec.get("pre_tokenizer"))):
            return None
        vocab = backend.get_vocab(with_added_tokens=True)
        if not _every_byte_encodable(spec, vocab):
            return None
        return max((len(token.encode("utf-8")) for token in vocab), default=0) or None


def _chars_covering(text: str, need: int) -> int:
    """A number of leading characters of `text` holding at least `need` non-space bytes (which
    `text` as a whole has): doubled from the fewest characters that could hold them (4 bytes
    each) until they do, so the cost is a few passes over the prefix, never the whole text."""
    chars = max(1, -(-need // 4))
    while chars < len(text) and non_space_bytes(text[:chars]) < need:
        chars = min(len(text), 2 * chars)
    return min(chars, len(text))


def _keeps_text(normalizer: dict[str, Any] | None) -> bool:
    """Whether the normalizer never lowers the number of non-space bytes."""
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_keeps_text(n) for n in normalizer.get("normalizers", []))
    if kind in ("Prepend", "Strip"):  # Strip removes whitespace only
        return True
    if kind == "Replace":
        matched = _literal(normalizer.get("pattern", {}))
        if matched is None:  # a regex may match any length
            return False
        return non_space_bytes(normalizer.get("content", "")) >= non_space_bytes(matched)
    return False


def _literal(pattern: dict[str, str]) -> str | None:
    """The text a Replace pattern matches when it is fixed: a string, or a regex that is a
    literal anchored at the start (`\\A▁`, Llama 2's)."""
    if "String" in pattern:
        return pattern["String"]
    regex = pattern.get("Regex", "")
    literal = regex.removeprefix("\\A")
    return literal if literal != regex and re.escape(literal) == literal else None


def _pre_tokenizer_keeps_text(pre: dict[str, Any] | None) -> bool:
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_text(p) for p in pre.get("pretokenizers", []))
    if kind in ("Split", "Punctuation"):
        return pre.get("behavior") != "Removed"
    return kind in _KEEPS_TEXT_PRE_TOKENIZERS


def _every_byte_encodable(spec: dict[str, Any], vocab: dict[str, int]) -> bool:
    """A BPE model that has a token for every byte: byte fallback, or the byte-level alphabet."""
    from tokenizers.pre_tokenizers import ByteLevel

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return False
    if model.get("byte_fallback"):
        return all(f"<0x{b:02X}>" in vocab for b in range(256))
    return _uses_byte_level(spec.get("pre_tokenizer")) and all(c in vocab for c in ByteLevel.alphabet())


def _uses_byte_level(pre: dict[str, Any] | None) -> bool:
    if pre is None:
        return False
    if pre.get("type") == "Sequence":
        return any(_uses_byte_level(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "ByteLevel"
