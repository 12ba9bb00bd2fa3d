"""Reasoning and tool-use rows: content parts (`text` / `reasoning` / `thinking` / `tool_call`, text
under `text` or `value`), reasoning fields (`reasoning_content`, `reasoning`, `thinking`), and
LLaMA-Factory's reasoning + tool-use rows, which load, validate, preview and train."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.data.formats import to_example
from exemplar.data.schema import IGNORE_INDEX, SourceRow
from exemplar.errors import RowError
from exemplar.quickstart import tokenizer_path
from exemplar.train.finetune import finetune
from tests.train_helpers import write_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def convert(row: dict, fmt: str = "auto"):
    return to_example(SourceRow("r.jsonl", "line 3", 2, row), fmt)


def error(row: dict) -> RowError:
    with pytest.raises(RowError) as e:
        convert(row)
    return e.value


def text(value: str, key: str = "value") -> dict:
    return {"type": "text", key: value}


USER = {"role": "user", "content": [text("What is 2 + 2?")]}

# -- content parts and reasoning fields ---------------------------------------------------------


def test_parts_carry_text_reasoning_and_tool_calls():
    conv = convert(
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "reasoning", "value": "Add them. "},
                        {"type": "thinking", "text": "Use the tool."},
                        text("Let me check."),
                        {"type": "tool_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 2}}'},
                        {"type": "tool_call", "value": {"name": "add", "arguments": '{"a": 1, "b": 3}'}},
                        {"type": "tool_call", "function": {"name": "log", "arguments": {}}, "id": "c3"},
                    ],
                },
            ]
        }
    )
    reply = conv.messages[1]
    assert conv.messages[0].content == "What is 2 + 2?"
    assert reply.content == "Let me check." and reply.reasoning_content == "Add them. Use the tool."
    assert reply.tool_calls == [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}},
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 3}}},
        {"type": "function", "function": {"name": "log", "arguments": {}}, "id": "c3"},
    ]


def test_tool_call_parts_join_the_tool_calls_field_and_need_no_text():
    conv = convert(
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "first", "arguments": {}}}],
                    "content": [{"type": "tool_call", "value": {"name": "second", "arguments": {}}}],
                },
            ]
        }
    )
    reply = conv.messages[1]
    assert reply.content == "" and [c["function"]["name"] for c in reply.tool_calls] == ["first", "second"]


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_fields_are_one_thing(key):
    for row in (
        {"messages": [USER, {"role": "assistant", "content": "4", key: "2 and 2 make 4."}]},
        {
            "conversations": [
                {"from": "human", "value": "2 + 2?"},
                {"from": "gpt", "value": "4", key: "2 and 2."},
            ]
        },
    ):
        reply = convert(row).messages[-1]
        assert reply.content == "4" and reply.reasoning_content.startswith("2 and 2")


def test_an_anthropic_style_thinking_part_and_a_reply_of_reasoning_alone():
    conv = convert(
        {"messages": [USER, {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm."}]}]}
    )
    assert conv.messages[1].content == "" and conv.messages[1].reasoning_content == "Hmm."


def test_loss_weight_is_an_alias_of_weight():
    conv = convert(
        {
            "messages": [
                {**USER, "loss_weight": 0.0},
                {"role": "assistant", "content": [text("4")], "loss_weight": 1.0},
            ]
        }
    )
    assert [m.train for m in conv.messages] == [False, True]


@pytest.mark.parametrize(
    ("messages", "field", "says"),
    [
        (
            [{"role": "user", "content": [{"type": "reasoning", "value": "x"}]}],
            "messages[0].content[0].type",
            "a 'reasoning' part belongs in an assistant message, not 'user'",
        ),
        (
            [USER, {"role": "assistant", "content": [{"type": "code", "value": "x"}]}],
            "messages[1].content[0].type",
            "unknown content part type 'code'; accepted: text, reasoning, thinking, tool_call",
        ),
        (
            [USER, {"role": "assistant", "content": [{"type": "tool_call", "value": "{oops"}]}],
            "messages[1].content[0].value",
            "tool_call value is not valid JSON",
        ),
        (
            [USER, {"role": "assistant", "content": [{"type": "tool_call", "value": {"arguments": {}}}]}],
            "messages[1].content[0].value.name",
            "non-empty string name",
        ),
        (
            [USER, {"role": "assistant", "content": [{"type": "text"}]}],
            "messages[1].content[0].text",
            "a 'text' part needs its text under 'text' or 'value'",
        ),
        (
            [USER, {"role": "assistant", "content": [text(7)]}],
            "messages[1].content[0].value",
            "expected a string, got a number (7)",
        ),
        (
            [USER, {"role": "assistant", "content": "4", "reasoning": "a", "thinking": "b"}],
            "messages[1].thinking",
            "the reasoning is given twice (reasoning and thinking); keep one",
        ),
        (
            [USER, {"role": "assistant", "content": [{"type": "reasoning", "value": "a"}], "reasoning": "b"}],
            "messages[1].content[0]",
            "the reasoning is given twice (reasoning and reasoning parts)",
        ),
        (
            [{"role": "user", "content": "q", "thinking": "b"}],
            "messages[0].thinking",
            "only assistant messages have reasoning, not 'user'",
        ),
        (
            [USER, {"role": "assistant", "content": []}],
            "messages[1].content",
            "assistant message is empty",
        ),
    ],
)
def test_wrong_parts_name_file_line_and_field(messages, field, says):
    e = error({"messages": messages})
    assert e.field == field and says in e.message
    assert str(e).startswith(f"r.jsonl, line 3, field '{field}'")


PART = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=8)),
    st.tuples(st.sampled_from(["reasoning", "thinking"]), st.text(max_size=8)),
    st.tuples(st.just("tool_call"), st.from_regex(r"[a-z]{1,6}", fullmatch=True)),
)


@given(st.lists(PART, min_size=1, max_size=6), st.sampled_from(["text", "value"]))
def test_property_parts_of_each_kind_join_in_order(parts, key):
    content = []
    for kind, value in parts:
        if kind == "tool_call":
            content.append({"type": kind, "value": json.dumps({"name": value, "arguments": {"x": 1}})})
        else:
            content.append({"type": kind, key: value})
    texts = "".join(v for k, v in parts if k == "text")
    reasoning = [v for k, v in parts if k in ("reasoning", "thinking")]
    calls = [v for k, v in parts if k == "tool_call"]
    if not texts.strip() and not "".join(reasoning).strip() and not calls:
        return  # an empty reply: rejected, tested above
    reply = convert({"messages": [USER, {"role": "assistant", "content": content}]}).messages[1]
    assert reply.content == texts
    assert reply.reasoning_content == ("".join(reasoning) if reasoning else None)
    assert [c["function"]["name"] for c in reply.tool_calls or []] == calls
    assert all(c["function"]["arguments"] == {"x": 1} for c in reply.tool_calls or [])


# -- LLaMA-Factory's reasoning + tool-use rows, end to end --------------------------------------

TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": "lookup_film",
                "description": "Facts about a film",
                "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
            },
        }
    ]
)


def llamafactory_rows(n: int = 6) -> tuple[list[dict], list[dict]]:
    """Rows in the shape of LLaMA-Factory's reason_tool_use demo (OpenAI messages whose content
    is parts with text under `value`, `reasoning` and `tool_call` parts, tools as a JSON string),
    and of its ShareGPT tool data with `<think>` in the values."""
    rows = []
    for i in range(n):
        title = f"Film {i}"
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": [text("Use the tools when they help.")]},
                    {"role": "user", "content": [text(f"Who directed {title}?")]},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "reasoning", "value": f"I should look {title} up."},
                            {
                                "type": "tool_call",
                                "value": json.dumps({"name": "lookup_film", "arguments": {"title": title}}),
                            },
                            {
                                "type": "tool_call",
                                "value": json.dumps(
                                    {"name": "lookup_film", "arguments": {"title": title + " II"}}
                                ),
                            },
                        ],
                    },
                    {"role": "tool", "content": [text(json.dumps({"director": f"Director {i}"}))]},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "reasoning", "value": "The tool answered."},
                            text(f"{title} was directed by Director {i}."),
                        ],
                    },
                ],
                "tools": TOOLS,
            }
        )
    sharegpt = [
        {
            "conversations": [
                {"from": "human", "value": f"Who directed Film {i}?"},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "lookup_film", "arguments": {"title": f"Film {i}"}}),
                },
                {"from": "observation", "value": json.dumps({"director": f"Director {i}"})},
                {"from": "gpt", "value": f"<think>The tool says Director {i}.</think>Director {i}."},
            ],
            "system": "Use the tools when they help.",
            "tools": TOOLS,
        }
        for i in range(n)
    ]
    return rows, sharegpt


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def demo_config(tmp_path):
    messages, sharegpt = llamafactory_rows()
    files = [
        write_rows(tmp_path / "reason_tool_use.jsonl", messages),
        write_rows(tmp_path / "glaive_think.jsonl", sharegpt),
    ]
    return write_run_config(tmp_path, files, max_length=512)


def test_llamafactory_reasoning_tool_rows_validate_with_their_formats(demo_config, capsys):
    assert main(["data", "validate", str(demo_config)]) == 0
    out = capsys.readouterr().out
    assert "reason_tool_use.jsonl: format messages" in out and "glaive_think.jsonl: format sharegpt" in out
    assert "12 rows in 2 file(s) checked: ok" in out


def test_llamafactory_reasoning_tool_rows_preview_train_the_calls_and_answers(demo_config, capsys):
    assert main(["data", "preview", str(demo_config), "--json", "--limit", "0"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [item["index"] for item in items] == list(range(12))
    assert [item["format"] for item in items] == ["messages"] * 6 + ["sharegpt"] * 6
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    for item in items:
        ids, labels = item["input_ids"], item["labels"]
        trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
        untrained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
        assert '"name": "lookup_film"' in trained and "<|im_end|>" in trained
        assert "Who directed" in untrained and '"director"' in untrained  # the question and tool result
        if item["format"] == "sharegpt":
            assert "<think>The tool says Director" in trained


def test_llamafactory_reasoning_tool_rows_train_a_tiny_model(demo_config):
    summary = finetune(load_config(demo_config), progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    data = "\n".join(line for source in summary["data"] for line in source)
    assert "reason_tool_use.jsonl: 6 rows, 6 kept" in data and "format: messages" in data
    assert "glaive_think.jsonl: 6 rows, 6 kept" in data and "format: sharegpt" in data
