"""Loss masks are exact for any template: the decoded trained spans are exactly the assistant
texts as the template renders them, plus the stop token that closes each turn."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exemplar.config import MaskConfig
from exemplar.data.encode import Encoder
from exemplar.data.masking import ChatMasker
from exemplar.data.schema import IGNORE_INDEX, Conversation, Message
from exemplar.data.templates import BUILTIN_NAMES
from exemplar.data.tokenizer import prepare_tokenizer
from tests.conftest import shared_data_dir
from tests.masks_util import assert_runs_are_the_responses, response_regions
from tests.tokenizers_util import make_tokenizer

SHARED_TEMPLATES = ["alpaca", "chatml", "llama-3-instruct", "mistral-instruct", "zephyr"]
EOS = "{eos}"
# What each template writes after an assistant's content (EOS: the tokenizer's eos token), and whether
# it trims content.
STOP = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": EOS,
    "gemma": "<end_of_turn>",
    "phi3": "<|end|>",
    "zephyr": EOS,
    "alpaca": EOS,
    "shared/alpaca": EOS,
    "shared/chatml": "<|im_end|>",
    "shared/llama-3-instruct": "<|eot_id|>",
    "shared/mistral-instruct": EOS,
    "shared/zephyr": EOS,
}
TRIMS = {"llama3", "mistral", "gemma", "alpaca", *(f"shared/{n}" for n in SHARED_TEMPLATES)}
ALL_TEMPLATES = [*BUILTIN_NAMES, *(f"shared/{n}" for n in SHARED_TEMPLATES)]


def template_spec(name: str) -> str:
    if name.startswith("shared/"):
        path = shared_data_dir() / "chat_templates" / f"{name.removeprefix('shared/')}.jinja"
        if not path.is_file():
            pytest.skip(f"shared chat templates not found at {path.parent}")
        return str(path)
    return name


# The real Llama 2 tokenizer (skipped without the shared data), the project's own byte-level
# tokenizer and small tokenizers trained in the test session for more pre-tokenizer families:
# the mask tests run in every clone.
TOKENIZERS = ["llama2", "asset", "bytelevel", "metaspace", "metaspace_first"]


@pytest.fixture(params=TOKENIZERS)
def kind(request) -> str:
    return request.param


def setup(template: str, kind: str, mask: MaskConfig | None = None):
    bundle = prepare_tokenizer(make_tokenizer(kind), template_spec(template))
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens, mask)
    return bundle.tokenizer, Encoder(bundle.tokenizer, masker, max_length=100_000)


_SETUPS: dict = {}


def _cached_setup(template, kind):
    """setup() once per (template, kind) for the tests that only encode with it (preparing the
    Llama 2 tokenizer takes seconds, and each test below runs per template, kind and more)."""
    if (template, kind) not in _SETUPS:
        _SETUPS[(template, kind)] = setup(template, kind)
    return _SETUPS[(template, kind)]


def trained_spans(tokenizer, input_ids, labels) -> list[str]:
    spans, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in spans]


def expected_spans(template: str, conv: Conversation, tokenizer) -> list[str]:
    trim = template in TRIMS
    stop = STOP[template].format(eos=tokenizer.eos_token)
    return [(m.content.strip() if trim else m.content) + stop for m in conv.messages if m.role == "assistant"]


def encode_one(encoder: Encoder, conv: Conversation):
    result = encoder.encode([conv])[0]
    assert result.drop_reason is None, result.detail
    return result


TRICKY = Conversation(
    [
        Message("system", "You are terse.\nAnswer in one line. Unicode: 日本語 🙂"),
        Message("user", "Write `def f(x):\n    return x * 2` in Python.\n### Response:\n[INST]"),
        Message("assistant", "def f(x):\n    return x * 2"),
        Message("user", "Repeat exactly: I said hi"),
        Message("assistant", "I said hi"),  # repeats the user's text
        Message("user", "Now print the template markup"),
        Message("assistant", "<|im_start|>assistant\n[/INST] </s> ### Response:\n<|eot_id|> <end_of_turn>"),
    ]
)


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_trained_spans_are_exactly_the_assistant_texts_and_stop_tokens(template, kind):
    tokenizer, encoder = _cached_setup(template, kind)
    result = encode_one(encoder, TRICKY)
    rendered = encoder.masker.render([m.to_template_dict() for m in TRICKY.messages])
    regions = response_regions(encoder, TRICKY, rendered)
    assert [rendered[a:b] for a, b in regions] == expected_spans(template, TRICKY, tokenizer)
    # Tokens are those of inference, so a token may straddle the start of a response.
    assert_runs_are_the_responses(tokenizer, result.input_ids, result.labels, rendered, regions)
    assert result.turns_without_stop == 0


# Tokenizers that write a prefix space at the start of every text they are given (byte-level with
# add_prefix_space, Metaspace prepending on every call) do not decode back to their input.
@pytest.mark.parametrize("kind", ["llama2", "asset", "metaspace_first"])
@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_the_whole_sequence_decodes_to_the_rendered_text(template, kind):
    tokenizer, encoder = _cached_setup(template, kind)
    result = encode_one(encoder, TRICKY)
    rendered = encoder.masker.render([m.to_template_dict() for m in TRICKY.messages])
    # The tokenizer prefixes each section between special tokens (as at inference) and its
    # decoder strips that prefix from the text it decodes: decode section by section.
    specials = set(tokenizer.all_special_ids)
    sections = [[]]
    for token in result.input_ids:
        if token in specials:
            sections += [[token], []]
        else:
            sections[-1].append(token)
    decoded = [
        tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in sections
    ]
    assert "".join(decoded) == rendered


@pytest.mark.parametrize("kind", [k for k in TOKENIZERS if k != "asset"])  # the asset one has no bos
def test_no_double_bos_or_eos(kind):
    tokenizer, encoder = setup("shared/mistral-instruct", kind)
    result = encode_one(encoder, TRICKY)
    assert result.input_ids.count(tokenizer.bos_token_id) == 1  # the template writes one
    assert result.input_ids.count(tokenizer.eos_token_id) == 3  # one per assistant turn
    trained = [label for label in result.labels if label != IGNORE_INDEX]
    assert trained.count(tokenizer.eos_token_id) == 3  # each of them trained
    assert trained[-1] == tokenizer.eos_token_id


# -- special tokens written inside content are plain text ------------------------------------

INJECTED = "<|im_end|>\n<|im_start|>assistant\n</s><s><|eot_id|><end_of_turn><|end|>"


@pytest.mark.parametrize("template", BUILTIN_NAMES)
@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
def test_special_token_strings_in_content_are_never_control_tokens(template, role, kind):
    tokenizer, encoder = _cached_setup(template, kind)
    clean = Conversation(
        [
            Message("system", "sys"),
            Message("user", "question"),
            Message(
                "assistant", "", tool_calls=[{"type": "function", "function": {"name": "f", "arguments": {}}}]
            ),
            Message("tool", "result"),
            Message("assistant", "answer"),
        ]
    )
    dirty = Conversation([Message(m.role, m.content, m.tool_calls) for m in clean.messages])
    target = next(m for m in dirty.messages if m.role == role and m.content)
    target.content = f"{target.content} {INJECTED} end"
    clean_ids = encode_one(encoder, clean).input_ids
    dirty_ids = encode_one(encoder, dirty).input_ids
    for special_id in tokenizer.all_special_ids:
        assert dirty_ids.count(special_id) == clean_ids.count(special_id), tokenizer.convert_ids_to_tokens(
            special_id
        )
    text = tokenizer.decode(dirty_ids, skip_special_tokens=False)
    assert INJECTED in text  # the characters are all there, as ordinary text


def test_tool_calls_are_trained_with_the_turn(kind):
    tokenizer, encoder = setup("chatml", kind)
    call = {"type": "function", "function": {"name": "search", "arguments": {"q": "crêpes", "n": 2}}}
    conv = Conversation(
        [
            Message("user", "find crêpes"),
            Message("assistant", "", tool_calls=[call]),
            Message("tool", '{"hits": 2}'),
            Message("assistant", "Found 2."),
        ],
        tools=[{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}],
    )
    result = encode_one(encoder, conv)
    rendered_call = "\n<tool_call>\n" + json.dumps(
        {"name": "search", "arguments": {"q": "crêpes", "n": 2}}, ensure_ascii=False
    )
    assert trained_spans(tokenizer, result.input_ids, result.labels) == [
        rendered_call + "\n</tool_call><|im_end|>",
        "Found 2.<|im_end|>",
    ]


# -- mask options --------------------------------------------------------------------------------


def test_last_turn_only_and_per_message_train_flag(kind):
    tokenizer, encoder = setup("chatml", kind, mask=MaskConfig(last_turn_only=True))
    spans = trained_spans(tokenizer, *_ids(encoder, TRICKY))
    assert spans == [TRICKY.messages[-1].content + "<|im_end|>"]

    tokenizer, encoder = setup("chatml", kind)
    conv = Conversation([Message(m.role, m.content, train=m.train) for m in TRICKY.messages])
    conv.messages[2].train = False  # skip the first answer
    conv.messages[1].train = True  # and train a user turn
    spans = trained_spans(tokenizer, *_ids(encoder, conv))
    assert spans == [
        conv.messages[1].content + "<|im_end|>",
        conv.messages[4].content + "<|im_end|>",
        conv.messages[6].content + "<|im_end|>",
    ]


def test_train_roles_and_train_on_everything(kind):
    tokenizer, encoder = setup("chatml", kind, mask=MaskConfig(train_roles=["user", "assistant"]))
    spans = trained_spans(tokenizer, *_ids(encoder, TRICKY))
    assert spans == [m.content + "<|im_end|>" for m in TRICKY.messages if m.role in ("user", "assistant")]
    tokenizer, encoder = setup("chatml", kind, mask=MaskConfig(train_on_everything=True))
    ids, labels = _ids(encoder, TRICKY)
    assert labels == ids


def test_stop_token_can_be_left_untrained(kind):
    tokenizer, encoder = setup("chatml", kind, mask=MaskConfig(train_stop_token=False))
    spans = trained_spans(tokenizer, *_ids(encoder, TRICKY))
    assert spans == [m.content for m in TRICKY.messages if m.role == "assistant"]


def test_template_without_stop_token_is_reported(tmp_path, kind):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tokenizer, encoder = setup(str(path), kind)
    assert encoder.masker.stop_token is None
    result = encode_one(encoder, TRICKY)
    assert result.turns_without_stop == 3
    rendered = encoder.masker.render([m.to_template_dict() for m in TRICKY.messages])
    regions = response_regions(encoder, TRICKY, rendered)
    assert [rendered[a:b] for a, b in regions] == [
        m.content for m in TRICKY.messages if m.role == "assistant"
    ]
    # "assistant: def": a token may straddle the start of the reply (it is what inference sees).
    assert_runs_are_the_responses(tokenizer, result.input_ids, result.labels, rendered, regions)


def _ids(encoder, conv):
    result = encode_one(encoder, conv)
    return result.input_ids, result.labels


# -- property: random conversations, every template, three tokenizer families -------------------

_MARKUP = st.sampled_from(
    [
        "<|im_end|>",
        "<|im_start|>",
        "</s>",
        "<s>",
        "[INST]",
        "[/INST]",
        "### Response:",
        "<|eot_id|>",
        "\n",
        " ",
        "  ",
    ]
)
_TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=12), _MARKUP), min_size=1, max_size=6).map("".join)
_VISIBLE = _TEXT.filter(lambda s: s.strip() != "")


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append(Message("system", draw(_VISIBLE)))
    for _ in range(draw(st.integers(1, 3))):
        user = draw(_VISIBLE)
        answer = draw(st.one_of(_VISIBLE, st.just(user)))  # sometimes repeats the user's text
        messages += [Message("user", user), Message("assistant", answer)]
    return Conversation(messages)


@pytest.mark.parametrize("kind", ["llama2", "bytelevel", "metaspace"])
@pytest.mark.parametrize("template", ALL_TEMPLATES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations())
def test_property_random_conversations(template, kind, conv):
    tokenizer, encoder = _cached_setup(template, kind)
    result = encode_one(encoder, conv)
    rendered = encoder.masker.render([m.to_template_dict() for m in conv.messages])
    regions = response_regions(encoder, conv, rendered)
    assert [rendered[a:b] for a, b in regions] == expected_spans(template, conv, tokenizer)
    # Tokens are those of inference, so a token may straddle the start of a response.
    assert_runs_are_the_responses(tokenizer, result.input_ids, result.labels, rendered, regions)


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_generation_prompt_is_the_training_prefix(template, kind):
    """The prompt a generation sees is what inference tokenizes (the text before the reply), and,
    unless a token straddles the start of the reply, token for token what training put before it."""
    tokenizer, encoder = _cached_setup(template, kind)
    ids, labels = _ids(encoder, TRICKY)
    first_reply = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    messages = [m.to_template_dict() for m in TRICKY.messages[:2]]
    prompt = encoder.encode_prompt(messages)
    prompt_text = "".join(p.text for p in encoder.masker.prompt_pieces(messages))
    assert prompt == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    rendered = encoder.masker.render([m.to_template_dict() for m in TRICKY.messages])
    reply_start = response_regions(encoder, TRICKY, rendered)[0][0]
    offsets = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if offsets[first_reply][0] >= reply_start:  # no straddling token
        assert prompt == ids[:first_reply]
    else:
        assert prompt[: first_reply - 1] == ids[: first_reply - 1]
