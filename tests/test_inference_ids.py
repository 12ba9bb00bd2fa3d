"""Training ids are the ids the inference stack builds: `tokenizer.apply_chat_template(conv,
tokenize=True)` (transformers, vLLM, TRL) on the tokenizer as the pipeline prepares it, except
that special-token strings typed in message content stay text. A token is trained when it holds
text of the assistant's response (its content as rendered, through the stop token), so a token
that straddles the prompt/response boundary is trained; system, user, tool and header text never is.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from exemplar.data.encode import Encoder
from exemplar.data.masking import ChatMasker
from exemplar.data.schema import IGNORE_INDEX, Conversation, Message
from tests.conftest import ASSET_TOKENIZER_DIR
from tests.masks_util import assert_runs_are_the_responses, response_regions
from tests.test_masking import ALL_TEMPLATES, INJECTED, template_spec
from tests.tokenizers_util import llama2_tokenizer, trained_tokenizer

KINDS = ["llama2", "asset", "bytelevel", "metaspace", "sentencepiece", "metaspace_first"]


def _tokenizer(kind: str):
    if kind == "llama2":
        tok = llama2_tokenizer()
        if tok is None:
            pytest.skip("the Llama 2 tokenizer is not in the shared data folder")
        return tok
    if kind == "asset":
        return AutoTokenizer.from_pretrained(ASSET_TOKENIZER_DIR)
    return trained_tokenizer(kind)


_SETUPS: dict = {}


def setup(template: str, kind: str):
    """The tokenizer as the pipeline prepares it (template set, its tokens added) and an encoder."""
    from exemplar.data.tokenizer import prepare_tokenizer

    spec = template_spec(template)
    if (spec, kind) not in _SETUPS:
        bundle = prepare_tokenizer(_tokenizer(kind), spec)
        masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
        _SETUPS[(spec, kind)] = (bundle.tokenizer, Encoder(bundle.tokenizer, masker, max_length=100_000))
    return _SETUPS[(spec, kind)]


def encode(encoder: Encoder, conv: Conversation) -> tuple[list[int], list[int]]:
    result = encoder.encode([conv])[0]
    assert result.drop_reason is None, result.detail
    return result.input_ids, result.labels


def inference_ids(tokenizer, conv: Conversation) -> list[int]:
    import jinja2

    messages = [m.to_template_dict() for m in conv.messages]
    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    except jinja2.UndefinedError as e:  # e.g. the asset tokenizer has no BOS for `bos_token`
        pytest.skip(f"transformers cannot render this template with this tokenizer: {e}")


def assert_trained_iff_response(tokenizer, ids, labels, rendered, regions):
    """With the tokenizer's own offsets on the whole rendered text: a token is trained exactly when
    its characters overlap a response (so system, user and header text is never trained)."""
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == ids
    for i, (s, e) in enumerate(encoding["offset_mapping"]):
        overlaps = any(s < b and e > a for a, b in regions)
        assert (labels[i] != IGNORE_INDEX) == overlaps, (i, tokenizer.convert_ids_to_tokens(ids[i]), (s, e))


CONVERSATIONS = [
    Conversation([Message("user", "What is 2+2?"), Message("assistant", "It is 4.")]),
    Conversation(
        [
            Message("system", "You are terse.\nAnswer in one line. Unicode: 日本語 🙂"),
            Message("user", " What is  2+2? "),
            Message("assistant", "It is 4.\n\nSure"),
            Message("user", "thanks\n"),
            Message("assistant", " bye "),
        ]
    ),
    Conversation(
        [
            Message("user", "Écris « bonjour » en chinois"),
            Message("assistant", "你好 (nǐ hǎo)\n"),
            Message("user", "  and tabs\tand code:\n    x = 1"),
            Message("assistant", "def f(x):\n    return x * 2"),
        ]
    ),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_training_ids_are_the_inference_ids(template, kind):
    tokenizer, encoder = setup(template, kind)
    for conv in CONVERSATIONS:
        ids, labels = encode(encoder, conv)
        assert ids == inference_ids(tokenizer, conv)
        rendered = encoder.masker.render([m.to_template_dict() for m in conv.messages])
        regions = response_regions(encoder, conv, rendered)
        assert_trained_iff_response(tokenizer, ids, labels, rendered, regions)
        assert_runs_are_the_responses(tokenizer, ids, labels, rendered, regions)


def test_a_straddling_token_is_trained(tmp_path):
    """`User: What` where the template writes `User: ` and the response is `What`: inference has
    one token `▁What`, and so has training; it is trained (the model must generate it)."""
    from exemplar.data.tokenizer import prepare_tokenizer

    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}")
    bundle = prepare_tokenizer(_tokenizer("llama2"), str(path))
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
    encoder = Encoder(bundle.tokenizer, masker, max_length=1000)
    conv = Conversation([Message("user", "Hi"), Message("assistant", "What")])
    ids, labels = encode(encoder, conv)
    assert ids == inference_ids(bundle.tokenizer, conv)
    tokens = bundle.tokenizer.convert_ids_to_tokens(ids)
    trained = [t for t, label in zip(tokens, labels, strict=True) if label != IGNORE_INDEX]
    assert trained == ["▁What", "</s>"]


# -- special-token strings typed in content --------------------------------------------------


def _special_strings(tokenizer) -> re.Pattern:
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True) if s))


def _blanked(tokenizer, conv: Conversation) -> Conversation:
    pattern = _special_strings(tokenizer)
    return Conversation([Message(m.role, pattern.sub("x", m.content)) for m in conv.messages])


def _special_ids(tokenizer, ids) -> list[int]:
    specials = set(tokenizer.all_special_ids)
    return [t for t in ids if t in specials]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ALL_TEMPLATES)
@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_special_token_strings_in_content_stay_text(template, kind, role):
    """The typed strings are text tokens: the control tokens are the template's (those of the same
    conversation with the strings blanked out), the ids are the inference ids everywhere but in
    the section between template special tokens that holds the typed strings, and the masks are
    exact."""
    tokenizer, encoder = setup(template, kind)
    dirty = Conversation([Message(m.role, m.content) for m in CONVERSATIONS[1].messages])
    index = next(i for i, m in enumerate(dirty.messages) if m.role == role)
    dirty.messages[index].content = f"{dirty.messages[index].content} {INJECTED} end"
    ids, labels = encode(encoder, dirty)
    assert _special_ids(tokenizer, ids) == _special_ids(
        tokenizer, inference_ids(tokenizer, _blanked(tokenizer, dirty))
    )
    rendered = encoder.masker.render([m.to_template_dict() for m in dirty.messages])
    messages = [m.to_template_dict() for m in dirty.messages]
    a, b = encoder.masker.content_spans(messages, None, rendered)[index]
    pattern = _special_strings(tokenizer)
    section_start = max((m.end() for m in pattern.finditer(rendered[:a])), default=0)
    after = pattern.search(rendered, b)
    section_end = after.start() if after else len(rendered)
    reference = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert reference["input_ids"] == inference_ids(tokenizer, dirty)
    before = [
        t
        for t, (s, e) in zip(reference["input_ids"], reference["offset_mapping"], strict=True)
        if e <= section_start
    ]
    behind = [
        t
        for t, (s, e) in zip(reference["input_ids"], reference["offset_mapping"], strict=True)
        if s >= section_end
    ]
    assert ids[: len(before)] == before
    assert ids[len(ids) - len(behind) :] == behind
    middle = ids[len(before) : len(ids) - len(behind)]
    assert not set(middle) & set(tokenizer.all_special_ids)  # the typed strings are text tokens
    regions = response_regions(encoder, dirty, rendered)
    assert_runs_are_the_responses(tokenizer, ids, labels, rendered, regions)


# -- property: random conversations x templates x tokenizers ------------------------------------

_MARKUP = st.sampled_from(["<|im_end|>", "<|im_start|>", "</s>", "<s>", "<|eot_id|>", "<|end|>"])
_PLAIN = st.sampled_from(["\n", " ", "  ", "[INST]", "### Response:", "User:", "日本語", "🙂", "\t"])
_CLEAN_TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=10), _PLAIN), min_size=1, max_size=5).map(
    "".join
)
_DIRTY_TEXT = st.lists(st.one_of(_CLEAN_TEXT, _MARKUP), min_size=1, max_size=4).map("".join)


@st.composite
def conversations(draw, text):
    visible = text.filter(lambda s: s.strip() != "")
    messages = []
    if draw(st.booleans()):
        messages.append(Message("system", draw(visible)))
    for _ in range(draw(st.integers(1, 3))):
        user = draw(visible)
        messages += [Message("user", user), Message("assistant", draw(st.one_of(visible, st.just(user))))]
    return Conversation(messages)


def _no_special_strings(tokenizer, conv: Conversation) -> bool:
    pattern = _special_strings(tokenizer)
    return not any(pattern.search(m.content) for m in conv.messages)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ALL_TEMPLATES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clean=conversations(_CLEAN_TEXT), dirty=conversations(_DIRTY_TEXT))
def test_property_inference_ids_and_masks(template, kind, clean, dirty):
    tokenizer, encoder = setup(template, kind)
    for conv in (clean, dirty):
        ids, labels = encode(encoder, conv)
        rendered = encoder.masker.render([m.to_template_dict() for m in conv.messages])
        regions = response_regions(encoder, conv, rendered)
        if _no_special_strings(tokenizer, conv):
            assert ids == inference_ids(tokenizer, conv)
            assert_trained_iff_response(tokenizer, ids, labels, rendered, regions)
        else:  # the control tokens are the template's alone
            blanked = inference_ids(tokenizer, _blanked(tokenizer, conv))
            assert _special_ids(tokenizer, ids) == _special_ids(tokenizer, blanked)
        assert_runs_are_the_responses(tokenizer, ids, labels, rendered, regions)


# -- `exemplar data preview` ---------------------------------------------------------------------


def test_preview_shows_text_as_the_tokenizer_decodes_it(tmp_path, capsys):
    """A tokenizer whose decoder strips a token's leading space (as Llama 2's does) and that spells
    Chinese in byte tokens: decoded one token at a time the preview read "Hellothere:" and showed
    U+FFFD; decoded as runs, it shows the text, with the trained run still marked."""
    import json

    import yaml

    from exemplar.cli import main

    trained_tokenizer("metaspace_first").save_pretrained(tmp_path / "tok")
    row = {
        "messages": [
            {"role": "user", "content": "Say hello in Chinese"},
            {"role": "assistant", "content": "Hello there: 你好 (ni hao)"},
        ]
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    config = {
        "tokenizer": str(tmp_path / "tok"),
        "chat_template": "chatml",
        "data": {"train": [{"path": str(tmp_path / "d.jsonl")}], "cache_dir": str(tmp_path / "cache")},
        "max_length": 256,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "preview", str(tmp_path / "c.yaml"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "⟨<|im_start|>⟩assistant\n[[Hello there: 你好 (ni hao)⟨<|im_end|>⟩]]" in out
    assert "Say hello in Chinese⟨<|im_end|>⟩" in out and "\ufffd" not in out


@pytest.mark.parametrize("strip", ["lstrip", "rstrip"])
def test_special_tokens_that_take_the_whitespace_beside_them(strip):
    """Phi-3's tokenizer marks `<|end|>` (and others) rstrip: the tokenizer's split takes the
    whitespace after it into the token; training splits the template text the same way."""
    from tokenizers import AddedToken

    from exemplar.data.tokenizer import prepare_tokenizer

    tok = trained_tokenizer("bytelevel")
    tok.add_special_tokens(
        {"extra_special_tokens": [AddedToken("<|end|>", special=True, **{strip: True})]},
        replace_extra_special_tokens=False,
    )
    bundle = prepare_tokenizer(tok, "phi3")
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
    encoder = Encoder(bundle.tokenizer, masker, max_length=1000)
    for conv in CONVERSATIONS:
        ids, labels = encode(encoder, conv)
        assert ids == inference_ids(bundle.tokenizer, conv)
        if strip == "lstrip" and any(m.content != m.content.rstrip() for m in conv.messages):
            continue  # the stop token took the reply's last spaces: the run does not spell them
        rendered = masker.render([m.to_template_dict() for m in conv.messages])
        assert_runs_are_the_responses(
            bundle.tokenizer, ids, labels, rendered, response_regions(encoder, conv, rendered)
        )


def test_a_normalizer_that_strips_the_end_of_each_section():
    """With a `Strip` normalizer the header alone ("assistant\\n" -> "assistant") is not tokenized
    as it is at the start of its section: the labels come from the offsets, and the newline after
    the header stays untrained."""
    from tokenizers import normalizers

    from exemplar.data.tokenizer import prepare_tokenizer

    tok = trained_tokenizer("bytelevel")
    tok.backend_tokenizer.normalizer = normalizers.Strip(left=False, right=True)
    bundle = prepare_tokenizer(tok, "chatml")
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens)
    encoder = Encoder(bundle.tokenizer, masker, max_length=1000)
    for conv in CONVERSATIONS:
        ids, labels = encode(encoder, conv)
        assert ids == inference_ids(bundle.tokenizer, conv)
        rendered = masker.render([m.to_template_dict() for m in conv.messages])
        regions = response_regions(encoder, conv, rendered)
        assert_trained_iff_response(bundle.tokenizer, ids, labels, rendered, regions)
