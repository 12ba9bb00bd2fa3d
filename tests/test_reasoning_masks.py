"""Reasoning in the loss masks (issue 9): `reasoning_content` reaches the template, inline `<think>`
blocks survive templates that split them out of the content, reasoning is trained where the
template renders it (`mask.reasoning: as_rendered`), the earlier turns' reasoning that a template
drops is counted, and a `<think>\\n` that the generation prompt supplies stays untrained."""

from __future__ import annotations

import re
from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exemplar.config import DataConfig
from exemplar.data.masking import ChatMasker
from exemplar.data.schema import Conversation, Message
from exemplar.data.templates import builtin_template
from tests.tool_masks_util import (
    ALL,
    assert_marks,
    encode,
    inference_ids,
    renders,
    setup,
    trained_characters,
    trained_texts,
)


def multi_turn(inline: bool) -> Conversation:
    """Two assistant turns with reasoning, as a field or inline in the content."""

    def reply(reasoning: str, answer: str) -> Message:
        if inline:
            return Message("assistant", f"<think>{reasoning}</think>{answer}")
        return Message("assistant", answer, reasoning_content=reasoning)

    return Conversation(
        [
            Message("user", "USERONE what is 2+2?"),
            reply("THINKONE add them", "ANSONE 4"),
            Message("user", "USERTWO and 3+3?"),
            reply("THINKTWO add again", "ANSTWO 6"),
        ]
    )


def test_reasoning_content_reaches_the_template():
    rendered = Message("assistant", "a", reasoning_content="r").to_template_dict()
    assert rendered["reasoning_content"] == rendered["thinking"] == "r"
    assert "reasoning_content" not in Message("assistant", "a").to_template_dict()


def test_lfm_reads_reasoning_as_thinking():
    """LFM2.5 renders `message.thinking`, and only after the last user message."""
    runs, result = _runs("tools/LFM2.5-8B-A1B", multi_turn(inline=False))
    assert runs[0].startswith("ANSONE 4") and "THINKONE" not in runs[0]
    assert runs[1].startswith("<think>THINKTWO add again</think>ANSTWO 6")
    assert result.dropped_fields == {"reasoning_content": 1}


def _runs(template: str, conv: Conversation):
    tokenizer, encoder = setup(template)
    result = encode(encoder, conv)
    assert result.input_ids == inference_ids(tokenizer, conv)
    return trained_texts(tokenizer, result.input_ids, result.labels), result


def test_seed_oss_trains_the_reasoning_of_every_turn():
    runs, result = _runs("tools/ByteDance-Seed-OSS", multi_turn(inline=False))
    assert runs == [
        "<seed:think> THINKONE add them</seed:think>\nANSONE 4<seed:eos>",
        "<seed:think> THINKTWO add again</seed:think>\nANSTWO 6<seed:eos>",
    ]
    assert not result.dropped_fields


@pytest.mark.parametrize("inline", [False, True], ids=["field", "inline"])
def test_minimax_keeps_the_last_reasoning_and_the_prompt_supplies_think(inline):
    """MiniMax-M2 renders reasoning only after the last user message, and its generation prompt
    ends in `<think>\\n`: the model does not write that, so it stays untrained."""
    runs, result = _runs("tools/unsloth-MiniMax-M2", multi_turn(inline))
    if inline:  # the template leaves inline blocks as they are; the prompt's `<think>` is not trained
        assert runs == [
            "THINKONE add them</think>ANSONE 4[e~[",
            "THINKTWO add again</think>ANSTWO 6[e~[",
        ]
    else:  # the first turn's reasoning field is not rendered, and says so
        assert runs == ["ANSONE 4[e~[", "THINKTWO add again\n</think>\n\nANSTWO 6[e~["]
        assert result.dropped_fields == {"reasoning_content": 1}


@pytest.mark.parametrize("inline", [False, True], ids=["field", "inline"])
def test_glm_writes_an_empty_think_block_in_earlier_turns(inline):
    runs, result = _runs("tools/glm_4_5", multi_turn(inline))
    last = "<think>THINKTWO add again</think>\nANSTWO 6"
    # Inline, the content starts the output: the whitespace before it counts as the header's.
    assert runs == ["\n<think></think>\nANSONE 4", last if inline else "\n" + last]
    assert result.turns_without_stop == 2  # GLM writes no end-of-turn token


def test_deepseek_r1_strips_earlier_reasoning_from_the_content():
    runs, _ = _runs("tools/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", multi_turn(inline=True))
    assert runs == ["ANSONE 4<｜end of sentence｜>", "ANSTWO 6<｜end of sentence｜>"]


def test_command_r_renders_reasoning_of_tool_call_turns():
    call = {"type": "function", "id": "c1", "function": {"name": "calc", "arguments": {"x": "2+2"}}}
    conv = Conversation(
        [
            Message("user", "USERONE compute"),
            Message("assistant", "", tool_calls=[call], reasoning_content="THINKONE use calc"),
            Message("tool", "TOOLONE 4", tool_call_id="c1", name="calc"),
            Message("assistant", "ANSONE 4"),
        ]
    )
    runs, _ = _runs("tools/CohereForAI-c4ai-command-r7b-12-2024-tool_use", conv)
    assert runs[0].startswith("<|START_THINKING|> THINKONE use calc<|END_THINKING|><|START_ACTION|>")
    assert runs[0].endswith("<|END_ACTION|><|END_OF_TURN_TOKEN|>")


# -- strftime_now -----------------------------------------------------------------------------------


def test_strftime_now_renders_the_configured_date():
    template = builtin_template("chatml")
    template.source = "{{ strftime_now('%d %B %Y') }}|{% for m in messages %}{{ m.content }}{% endfor %}"
    masker = ChatMasker(template, {}, [], template_date="2026-03-04")
    assert masker.render([{"role": "user", "content": "x"}]) == "04 March 2026|x"
    default = ChatMasker(template, {}, [])
    assert default.render([{"role": "user", "content": "x"}]) == "01 January 2026|x"  # fixed, not today
    assert DataConfig().template_date == "2026-01-01"
    with pytest.raises(ValueError, match="not an ISO date"):
        DataConfig(template_date="yesterday")


def test_lfm_prints_the_configured_date():
    _, encoder = setup("tools/LFM2.5-8B-A1B")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    rendered = encoder.masker.render([{"role": "user", "content": "hi"}], tools)
    assert date.today().strftime("%Y-%m-%d") in rendered or date.today().strftime("%d %b %Y") in rendered


# -- property: random reasoning conversations x templates ---------------------------------------------

_TEXT = st.lists(st.sampled_from(["alpha", "日本語", "  ", "\n", "x = 1", "🙂", "it's"]), max_size=3).map(
    " ".join
)


@st.composite
def reasoning_conversations(draw):
    k = iter(range(1000))
    messages = []
    if draw(st.booleans()):
        messages.append(Message("system", f"USR{next(k)} {draw(_TEXT)}"))
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", f"USR{next(k)} {draw(_TEXT)}"))
        answer = f"ANS{next(k)} {draw(_TEXT)}"
        style = draw(st.sampled_from(["none", "field", "inline"]))
        thought = f"THK{next(k)} {draw(_TEXT)}"
        if style == "field":
            messages.append(Message("assistant", answer, reasoning_content=thought))
        elif style == "inline":
            messages.append(Message("assistant", f"<think>{thought}</think>{answer}"))
        else:
            messages.append(Message("assistant", answer))
    return Conversation(messages)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(template=st.sampled_from(ALL), conv=reasoning_conversations())
def test_property_random_reasoning_conversations(template, conv):
    """Ids are the inference ids; every answer and every rendered thought is trained; no user or
    system text is."""
    tokenizer, encoder = setup(template)
    if not renders(encoder, conv):
        return
    result = encode(encoder, conv)
    assert result.input_ids == inference_ids(tokenizer, conv)
    rendered = encoder.masker.render([m.to_template_dict() for m in conv.messages])
    flags = trained_characters(tokenizer, rendered, result.input_ids, result.labels)
    words = re.findall(
        r"(?:ANS|THK|USR)\d+", str([m.content + (m.reasoning_content or "") for m in conv.messages])
    )
    assert_marks(rendered, flags, [w for w in words if w[:3] != "USR"], [w for w in words if w[:3] == "USR"])
