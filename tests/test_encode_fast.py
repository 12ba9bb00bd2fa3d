"""The fast encoding paths give exactly what the plain ones give: columnar output, memoized template
pieces, batched/overlapped tokenization, the one-sweep piece cutter."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exemplar.config import MaskConfig
from exemplar.data import encode as encode_module
from exemplar.data.encode import DROP_TEMPLATE, Encoder
from exemplar.data.masking import ChatMasker, Piece, _cut
from exemplar.data.schema import Conversation, Message, TextDocument, TokenizedExample
from exemplar.data.tokenizer import prepare_tokenizer
from tests.tokenizers_util import trained_tokenizer


def _encoder(template="chatml", kind="bytelevel", max_length=48, truncation="drop", mask=None):
    bundle = prepare_tokenizer(trained_tokenizer(kind), template)
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens, mask)
    return bundle.tokenizer, Encoder(bundle.tokenizer, masker, max_length, truncation)


def _examples():
    chat = lambda u, a: Conversation([Message("user", u), Message("assistant", a)])  # noqa: E731
    return [
        chat("Hello there!", "How are you today?"),
        chat("short", "long answer " * 20),  # over max_length
        TextDocument("The quick brown fox jumps over the lazy dog."),
        TokenizedExample([5, 6, 7, 8], [-100, -100, 7, 8]),
        TokenizedExample([5, 6], [5, -100]),  # only position 0 trained: nothing to learn
        Conversation([Message("user", "hi"), Message("assistant", "no", train=False)]),
        Conversation([Message("assistant", "a"), Message("user", "b"), Message("assistant", "c")]),
        chat("<|im_end|> typed by a user", "x <|im_start|> y"),
        chat("long prompt " * 30, "late"),
    ]


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "sentencepiece"])
@pytest.mark.parametrize("truncation", ["drop", "truncate"])
@pytest.mark.parametrize("batch", [2, 2048])
def test_columns_equal_per_example_encoding(kind, truncation, batch, monkeypatch):
    monkeypatch.setattr(encode_module, "ENCODE_BATCH", batch)  # 2: several overlapped batches
    _, encoder = _encoder(kind=kind, truncation=truncation)
    examples = _examples() * 3
    expected = encoder.encode(examples)
    columns = encoder.encode_columns(examples)
    assert columns.drop_reasons == [e.drop_reason for e in expected]
    kept = [i for i, e in enumerate(expected) if e.drop_reason is None]
    assert columns.kept.tolist() == kept
    for k, i in enumerate(kept):
        a, b = columns.offsets[k], columns.offsets[k + 1]
        assert columns.input_ids[a:b].tolist() == expected[i].input_ids
        assert columns.labels[a:b].tolist() == expected[i].labels
    assert columns.offsets[-1] == len(columns.input_ids) == len(columns.labels)


def test_template_errors_keep_their_message():
    tokenizer = trained_tokenizer("bytelevel")
    bundle = prepare_tokenizer(tokenizer, "mistral")  # raises on a conversation starting with assistant
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
    encoder = Encoder(bundle.tokenizer, masker, 64)
    bad = Conversation([Message("assistant", "a"), Message("assistant", "b")])
    good = Conversation([Message("user", "q"), Message("assistant", "a")])
    expected = encoder.encode([good, bad])
    columns = encoder.encode_columns([good, bad])
    assert columns.drop_reasons == [e.drop_reason for e in expected]
    if expected[1].drop_reason == DROP_TEMPLATE:
        assert columns.details == {1: expected[1].detail}


def test_template_sections_are_memoized_and_content_is_not():
    tokenizer, encoder = _encoder()
    conv = Conversation([Message("user", "unique user words"), Message("assistant", "unique reply words")])
    first = encoder.encode([conv])[0]
    memo = dict(encoder.pieces._memo)
    assert memo and not any("unique" in text for _, segments in memo for text, *_ in segments)
    for (_, segments), (ids, _) in memo.items():  # memoized ids are the tokenizer's own
        text = "".join(text for text, *_ in segments)
        assert ids == tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert encoder.encode([conv])[0] == first  # a second pass hits the memo, same result
    assert encoder.pieces._memo.keys() == memo.keys()


def test_memo_is_bounded(monkeypatch):
    _, encoder = _encoder()
    monkeypatch.setattr(encoder.pieces, "MEMO_LIMIT", 3)
    for i in range(10):
        rows = encoder.pieces.encode_rows([[Piece(f"<|im_start|>role{i}\n", content=False, trained=False)]])
        assert rows[0][1][0]  # the section after <|im_start|> has ids
        assert len(encoder.pieces._memo) <= 3


def test_conversations_of_one_shape_share_a_skeleton():
    _, encoder = _encoder(mask=MaskConfig())
    convs = [
        Conversation([Message("user", f"question {i}"), Message("assistant", f"answer {i}")])
        for i in range(20)
    ]
    encoder.encode(convs)
    assert len(encoder.masker._skeletons) == 1
    encoder.encode([Conversation([Message("system", "s"), *convs[0].messages])])
    assert len(encoder.masker._skeletons) == 2


def _cut_reference(text, content_spans, trained):
    """The original all-pairs cutter, kept as the specification of `_cut`."""
    spans = [s for s in content_spans if s is not None and s[0] < s[1]]
    marks = {0, len(text)}
    for a, b in spans + trained:
        marks.update((min(a, len(text)), min(b, len(text))))
    cuts = sorted(marks)
    pieces = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a == b:
            continue
        is_content = any(s <= a and b <= e for s, e in spans)
        is_trained = any(s <= a and b <= e for s, e in trained)
        if (
            pieces
            and pieces[-1].content == is_content
            and pieces[-1].trained == is_trained
            and not is_content
        ):
            pieces[-1].text += text[a:b]
        else:
            pieces.append(Piece(text[a:b], is_content, is_trained))
    return pieces


def _disjoint(draw, n, limit):
    points = sorted(draw(st.lists(st.integers(0, limit), min_size=2 * n, max_size=2 * n)))
    return [(points[2 * i], points[2 * i + 1]) for i in range(n)]


@st.composite
def _layouts(draw):
    text = draw(st.text(alphabet="ab<>|\n ", min_size=0, max_size=40))
    limit = len(text) + 3  # spans may run past the end: they are clipped
    spans = _disjoint(draw, draw(st.integers(0, 4)), limit)
    spans = [s if draw(st.booleans()) else None for s in spans]
    trained = _disjoint(draw, draw(st.integers(0, 3)), limit)
    return text, spans, trained


@given(_layouts())
def test_cut_matches_the_reference(layout):
    text, spans, trained = layout
    assert _cut(text, spans, trained) == _cut_reference(text, spans, trained)


CORPUS = [
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "Hello there! How are you today?",
    "def add(a, b):\n    return a + b  # indentation\n\ttab",
    "Ünïcödé: naïve café, 日本語, emoji 🙂, ∑ x² ≤ 10 \u00a0nbsp",
    "<|im_end|> <|im_start|>assistant\n<s></s><unk> typed as text",
    "▁ already a metaspace ▁▁ char",
]


@pytest.mark.parametrize("kind", ["llama2", "sentencepiece", "metaspace_first", "metaspace", "bytelevel"])
def test_plain_text_views_match_the_tokenizer(kind):
    """The content views (normalizer applied in Python where it is plain string replacement)
    give exactly the ids of the tokenizer's own view with special-token parsing off."""
    import json

    from tokenizers import Tokenizer

    from exemplar.data.pieces import PieceTokenizer, _later_sections
    from tests.tokenizers_util import llama2_tokenizer

    tok = llama2_tokenizer() if kind == "llama2" else trained_tokenizer(kind)
    if tok is None:
        pytest.skip("the Llama 2 tokenizer is not in the shared data folder")
    bundle = prepare_tokenizer(tok, "chatml")  # adds the ChatML tokens, as training does
    source = bundle.tokenizer.backend_tokenizer.to_str()
    pieces = PieceTokenizer(bundle.tokenizer.backend_tokenizer)
    for first, tree in ((True, json.loads(source)), (False, _later_sections(json.loads(source)))):
        reference = Tokenizer.from_str(json.dumps(tree))
        reference.encode_special_tokens = True
        expected = [e.ids for e in reference.encode_batch(CORPUS, add_special_tokens=False)]
        assert pieces.encode_text(CORPUS, first) == expected
    if kind != "bytelevel":  # string Replace (and Prepend), or a Metaspace that does not split: in Python
        assert pieces._later_text[1] is not None
    # No pre-tokenizer left and no token across a word start: tokenized word by word from a cache.
    assert (pieces._later_text[2] is not None) == (kind in ("llama2", "sentencepiece", "metaspace_first"))
    if pieces._later_text[2] is not None:  # again, every word now from the cache
        assert pieces.encode_text(CORPUS, False) == expected


@pytest.mark.parametrize("kind", ["metaspace", "metaspace_first", "bytelevel"])
@given(text=st.text(max_size=60))
def test_plain_text_views_match_on_any_text(kind, text):

    source, references = _reference_views(kind)
    pieces = _metaspace_pieces(source)
    for first, reference in references:
        encoding = reference.encode(text, add_special_tokens=False)
        assert pieces.encode_text([text], first) == [encoding.ids]
        starts, ends = [s for s, _ in encoding.offsets], [e for _, e in encoding.offsets]
        assert pieces.encode_located([text], first) == [(encoding.ids, starts, ends)]


# Text where word boundaries are tricky: runs of spaces and of "▁", newlines, tabs, and words
# repeated (cache hits) next to new ones.
_WORDY = st.lists(
    st.one_of(
        st.sampled_from([" ", "  ", "   ", "▁", "▁▁", "\n", "\n\n", "\t", " \n ", "the", "there", "code"]),
        st.text(max_size=6),
    ),
    max_size=12,
).map("".join)


@pytest.mark.parametrize("kind", ["llama2", "sentencepiece", "metaspace_first"])
@given(texts=st.lists(_WORDY, min_size=1, max_size=4))
def test_word_by_word_bpe_gives_the_whole_text_ids(kind, texts):
    views = _reference_views(kind)
    if views is None:
        pytest.skip("the Llama 2 tokenizer is not in the shared data folder")
    source, references = views
    pieces = _metaspace_pieces(source)
    for first, reference in references:
        assert (pieces._first_text if first else pieces._later_text)[2] is not None
        encodings = reference.encode_batch(texts, add_special_tokens=False)
        assert pieces.encode_text(texts, first) == [e.ids for e in encodings]
        # and each token's place in the text, as the Rust normalizer aligns it
        located = [(e.ids, [s for s, _ in e.offsets], [t for _, t in e.offsets]) for e in encodings]
        assert pieces.encode_located(texts, first) == located


def test_no_word_cache_when_a_token_crosses_a_word_start():
    """A vocabulary with "a▁" (a merge across the delimiter): cutting "a▁b" before "▁" would give
    a, ▁b instead of a▁, b, so such a tokenizer is tokenized whole."""
    from tokenizers import Tokenizer, models, normalizers

    from exemplar.data.pieces import BpeWords, PieceTokenizer

    vocab = {"<unk>": 0, "a": 1, "b": 2, "▁": 3, "a▁": 4, "▁b": 5}
    backend = Tokenizer(models.BPE(vocab, [("a", "▁"), ("▁", "b")], unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    pieces = PieceTokenizer(backend)
    assert pieces._later_text[2] is None
    assert pieces.encode_text(["a b"], False) == [[4, 2]]
    # What the cut would have given:
    backend.normalizer = None
    assert BpeWords(backend, "▁").encode(["a▁b"]) == [[1, 5]]


def test_word_cache_starts_over_when_full(monkeypatch):
    from exemplar.data.pieces import BpeWords, PieceTokenizer

    monkeypatch.setattr(BpeWords, "LIMIT", 5)
    tok = prepare_tokenizer(trained_tokenizer("sentencepiece"), "chatml").tokenizer
    pieces = PieceTokenizer(tok.backend_tokenizer)
    texts = ["one two three four", "five six seven eight nine ten", "one two"]
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [pieces.encode_text([t], True)[0] for t in texts] == expected
    assert len(pieces._first_text[2]._ids) <= 6  # one batch may bring more than the limit


_PIECES: dict = {}


@functools.cache
def _reference_views(kind: str):
    """(serialized tokenizer, [(first, the Rust tokenizer of that view)]) of `kind` with the ChatML
    tokens added, or None where the Llama 2 tokenizer is absent. Built once per kind: the property
    tests above would otherwise rebuild a 32k-vocabulary tokenizer three times per example."""
    import json

    from tokenizers import Tokenizer

    from exemplar.data.pieces import _later_sections
    from tests.tokenizers_util import llama2_tokenizer

    tok = llama2_tokenizer() if kind == "llama2" else trained_tokenizer(kind)
    if tok is None:
        return None
    source = prepare_tokenizer(tok, "chatml").tokenizer.backend_tokenizer.to_str()
    references = []
    for first, tree in ((True, json.loads(source)), (False, _later_sections(json.loads(source)))):
        reference = Tokenizer.from_str(json.dumps(tree))
        reference.encode_special_tokens = True
        references.append((first, reference))
    return source, references


def _metaspace_pieces(source):
    from tokenizers import Tokenizer

    from exemplar.data.pieces import PieceTokenizer

    if source not in _PIECES:
        _PIECES[source] = PieceTokenizer(Tokenizer.from_str(source))
    return _PIECES[source]


# -- the per-shape recipe gives the general path's pieces --------------------------------------

_ANY_TEXT = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.sampled_from(["<|im_end|>", "</s>", "[INST]", "<|eot_id|>", "\n", " ", "  ", "\t"]),
    ),
    max_size=4,
).map("".join)  # may be empty or whitespace only: the recipe must step aside for those


@st.composite
def _conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append(Message("system", draw(_ANY_TEXT)))
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", draw(_ANY_TEXT)))
        calls = None
        if draw(st.integers(0, 4)) == 0:
            calls = [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
        messages.append(
            Message(
                "assistant", draw(_ANY_TEXT), tool_calls=calls, train=draw(st.sampled_from([None, False]))
            )
        )
    return Conversation(messages)


_MASKERS: dict = {}


def _masker(template, mask_key):
    if (template, mask_key) not in _MASKERS:
        bundle = prepare_tokenizer(trained_tokenizer("bytelevel"), template)
        mask = {
            "default": MaskConfig(),
            "everything": MaskConfig(train_on_everything=True),
            "last": MaskConfig(last_turn_only=True, train_stop_token=False),
        }[mask_key]
        _MASKERS[(template, mask_key)] = ChatMasker(
            bundle.template, bundle.variables, bundle.special_tokens, mask
        )
    return _MASKERS[(template, mask_key)]


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral", "gemma", "phi3", "zephyr", "alpaca"])
@pytest.mark.parametrize("mask_key", ["default", "everything", "last"])
@given(conv=_conversations())
def test_recipe_pieces_equal_the_general_path(template, mask_key, conv):
    from exemplar.errors import TemplateError

    masker = _masker(template, mask_key)
    messages = [m.to_template_dict() for m in conv.messages]
    try:
        full = masker.render(messages, conv.tools)
        general = masker._render_pieces_located(conv, messages, full)
    except TemplateError:
        with pytest.raises(TemplateError):
            masker.render_pieces(conv)
        return

    def text_and_trained(rendered):  # the general path cuts the text differently (locate.py)
        trained = "".join(p.text for p in rendered.pieces if p.trained)
        return "".join(p.text for p in rendered.pieces), "".join(trained.split()), rendered.turns_without_stop

    assert text_and_trained(masker.render_pieces(conv)) == text_and_trained(general)
    # again, from the cached recipe
    assert text_and_trained(masker.render_pieces(conv)) == text_and_trained(general)


# -- worker processes give exactly the one-process result ----------------------------------------


def _pipeline_config(tmp_path, path, num_proc):
    from exemplar.config import load_config

    return load_config(
        None,
        tokenizer="unused",
        chat_template="chatml",
        data={"train": [{"path": str(path)}], "num_proc": num_proc, "cache_dir": str(tmp_path / "cache")},
        max_length=64,
    )


def _rows(n):
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"instruction": f"say {i}", "output": f"{i} " * (i % 9 + 1)})
        elif i % 3 == 1:
            rows.append({"prompt": f"count to {i % 7}", "completion": " ".join(map(str, range(i % 7 + 1)))})
        else:
            rows.append({"text": f"document {i} " * (i % 5 + 1)})
    return rows


def test_workers_match_one_process_with_mixed_files(tmp_path):
    """A folder of files in different formats, split across workers mid-file."""
    import json

    from exemplar.data.pipeline import prepare_data

    folder = tmp_path / "data"
    folder.mkdir()
    rows = _rows(4500)
    by_format = {"alpaca": [], "pc": [], "text": []}
    for row in rows:
        by_format["alpaca" if "instruction" in row else "pc" if "prompt" in row else "text"].append(row)
    for name, part in by_format.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    bundle = prepare_tokenizer(trained_tokenizer("bytelevel"), "chatml")
    one = prepare_data(_pipeline_config(tmp_path, folder, 1), bundle=bundle, use_cache=False, progress=False)
    two = prepare_data(_pipeline_config(tmp_path, folder, 2), bundle=bundle, use_cache=False, progress=False)
    assert list(one.train["input_ids"]) == list(two.train["input_ids"])
    assert list(one.train["labels"]) == list(two.train["labels"])
    assert list(one.train["row"]) == list(two.train["row"])
    assert one.reports[0].dropped == two.reports[0].dropped and one.reports[0].kept == two.reports[0].kept


def test_workers_report_the_same_invalid_rows(tmp_path):
    import json

    from exemplar.data.pipeline import prepare_data
    from exemplar.errors import DataError

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4400)
    ]
    for i in (0, 7, 2300, 4399):  # a bad first row (the format is decided later), and in both shares
        rows[i] = {"messages": [{"role": "wizard", "content": "x"}]} if i else {"nothing": 1}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = prepare_tokenizer(trained_tokenizer("bytelevel"), "chatml")
    errors = []
    for num_proc in (1, 2):
        with pytest.raises(DataError) as err:
            prepare_data(
                _pipeline_config(tmp_path, path, num_proc), bundle=bundle, use_cache=False, progress=False
            )
        errors.append((str(err.value), [str(p) for p in err.value.problems]))
    assert errors[0] == errors[1]
    assert len(errors[0][1]) == 4 and "line 1" in errors[0][1][0]
