"""`truncation: truncate` tokenizes a long row only up to a cut that surely covers max_length
tokens: what it keeps equals the whole row tokenized, then truncated."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exemplar.data.encode import DROP_NO_TRAINED, DROP_NO_TRAINED_AFTER_TRUNCATION, Encoder
from exemplar.data.length_bound import TokenLowerBound
from exemplar.data.masking import ChatMasker
from exemplar.data.schema import IGNORE_INDEX, Conversation, Message, TextDocument
from exemplar.data.tokenizer import prepare_tokenizer
from tests.tokenizers_util import make_tokenizer

KINDS = ["bytelevel", "metaspace", "sentencepiece", "metaspace_first", "asset", "llama2"]


_ENCODERS: dict[tuple[str, int], tuple[Encoder, Encoder]] = {}


def _encoders(kind: str, max_length: int) -> tuple[Encoder, Encoder]:
    """(truncating at max_length, never truncating: the whole row)."""
    if (kind, max_length) not in _ENCODERS:
        bundle = prepare_tokenizer(make_tokenizer(kind), "chatml")
        masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
        _ENCODERS[(kind, max_length)] = (
            Encoder(bundle.tokenizer, masker, max_length, "truncate"),
            Encoder(bundle.tokenizer, masker, 10**12, "truncate"),
        )
    return _ENCODERS[(kind, max_length)]


def _truncated(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], str | None]:
    """The whole row's tokens with the truncate policy applied by hand."""
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        return [], [], DROP_NO_TRAINED
    ids, labels = ids[:max_length], labels[:max_length]
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        return [], [], DROP_NO_TRAINED_AFTER_TRUNCATION
    return ids, labels, None


def _check(kind: str, max_length: int, examples: list) -> None:
    cut, whole = _encoders(kind, max_length)
    expected = [
        ([], [], e.drop_reason) if e.drop_reason else _truncated(e.input_ids, e.labels, max_length)
        for e in whole.encode(examples)
    ]
    columns = cut.encode_columns(examples)
    assert columns.drop_reasons == [reason for _, _, reason in expected]
    kept = [(ids, labels) for ids, labels, reason in expected if reason is None]
    for k, (ids, labels) in enumerate(kept):
        a, b = columns.offsets[k], columns.offsets[k + 1]
        assert columns.input_ids[a:b].tolist() == ids
        assert columns.labels[a:b].tolist() == labels
    assert [(e.input_ids, e.labels) for e in cut.encode(examples) if e.drop_reason is None] == kept


_word = st.tuples(
    st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["word", "the", "42", "🙂", "naïve", "."])),
    st.sampled_from([" ", " ", " ", "\n", "\n\n", "  ", ". ", "\t", ""]),
).map("".join)
# Long texts (a few thousand to 30,000 characters, past the cut of every tokenizer here at these
# max_length) made of up to 30 random words (any characters) in a random order.
_long_text = st.tuples(
    st.lists(_word, min_size=1, max_size=30), st.lists(st.integers(0, 29), min_size=400, max_size=3000)
).map(lambda drawn: "".join(drawn[0][k % len(drawn[0])] for k in drawn[1]))
_words = st.one_of(st.lists(_word, max_size=50).map("".join), _long_text)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(
    max_length=st.integers(1, 48),
    prompt=_words,
    answer=_words,
    untrained=st.booleans(),
)
def test_a_cut_row_keeps_the_tokens_of_the_whole_row(kind, max_length, prompt, answer, untrained):
    """Rows of up to a few thousand characters of words and random text, max_length small
    enough that most are cut: the same ids, labels and drop reasons as the whole row."""
    chat = Conversation([Message("user", prompt), Message("assistant", answer, train=not untrained)])
    document = TextDocument(answer or "x")
    _check(kind, max_length, [chat, document])


@pytest.mark.parametrize("kind", KINDS)
def test_long_rows_are_cut_and_keep_their_tokens(kind):
    """Long rows the bound surely covers: a long answer, a long prompt (its trained answer past
    the cut: dropped as after truncation, as the whole row would be), a long document."""
    text = " ".join(f"word{k % 97} naïve, 🙂\n" if k % 5 == 0 else f"w{k}" for k in range(3000))
    cut, _ = _encoders(kind, 64)
    assert cut.length_bound.covering_prefix([text], 64 + 64) is not None  # really cut
    chat = lambda u, a: Conversation([Message("user", u), Message("assistant", a)])  # noqa: E731
    examples = [chat("hi", text), chat(text, "late"), TextDocument(text)]
    _check(kind, 64, examples)
    assert cut.encode_columns(examples).drop_reasons == [None, DROP_NO_TRAINED_AFTER_TRUNCATION, None]


def test_the_cut_needs_the_bound():
    """A WordPiece tokenizer has no byte bound: its rows are tokenized whole, as before."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert TokenLowerBound(backend).covering_prefix(["a " * 10_000], 10) is None
