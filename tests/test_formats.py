"""Formats: every input shape converts to the canonical example, and every mistake names its field."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exemplar.config import DatasetSpec
from exemplar.data.formats import convert_all, detect_format, to_example
from exemplar.data.schema import Conversation, SourceRow, TextDocument, TokenizedExample
from exemplar.errors import DataError, RowError


def src(data: dict, file: str = "train.jsonl", location: str = "line 7") -> SourceRow:
    return SourceRow(file=file, location=location, index=6, data=data)


def convert(data: dict, fmt: str = "auto", columns: dict | None = None):
    return to_example(src(data), fmt, columns or {})


def error(data: dict, fmt: str = "auto", columns: dict | None = None) -> RowError:
    with pytest.raises(RowError) as e:
        convert(data, fmt, columns)
    return e.value


def roles(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return path


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# ---------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        ({"messages": CHAT}, {}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}]}, {}, "sharegpt"),
        ({"messages": [{"from": "human", "value": "q"}]}, {}, "sharegpt"),
        ({"instruction": "q", "input": "", "output": "a"}, {}, "alpaca"),
        ({"prompt": "q", "completion": "a"}, {}, "prompt_completion"),
        ({"input_ids": [1, 2]}, {}, "tokenized"),
        ({"text": "t"}, {}, "text"),
        ({"question": "q", "answer": "a"}, {"instruction": "question", "output": "answer"}, "alpaca"),
        ({"chat": CHAT}, {"messages": "chat"}, "messages"),
        # "messages" is claimed by the conversations mapping, so it is not OpenAI messages.
        ({"messages": [{"role": "human", "content": "q"}]}, {"conversations": "messages"}, "sharegpt"),
        ({"instruction": "q"}, {}, "alpaca"),  # partial: conversion will name the missing output
        ({"text": None, "input_ids": [1]}, {}, "tokenized"),  # null (Parquet/CSV) counts as absent
    ],
)
def test_detect_format(row, columns, expected):
    assert detect_format(row, columns) == expected


def test_detect_unknown_shape_lists_keys_shapes_and_remedies():
    with pytest.raises(RowError) as e:
        detect_format({"question": "q", "answer": "a"}, {}, source=src({}))
    message = str(e.value)
    assert "train.jsonl, line 7" in message and "answer, question" in message
    assert "instruction + output" in message and "`columns:`" in message and "`format:`" in message


# ---------------------------------------------------------------------------------------------
# OpenAI messages


def test_messages_basic_and_content_parts():
    conv = convert(
        {
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "model", "content": "c"},
            ]
        }
    )
    assert roles(conv) == [("system", "be nice"), ("user", "ab"), ("assistant", "c")]
    assert conv.tools is None and all(m.train is None for m in conv.messages)


def test_image_part_is_rejected_with_path():
    e = error({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert e.field == "messages[0].content[0]" and "images/audio are not supported" in e.message


def test_tool_calls_with_string_and_dict_arguments_and_tool_replies():
    conv = convert(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "type": "function",
                            "id": "c1",
                            "function": {"name": "get", "arguments": '{"city": "Oslo"}'},
                        },
                        {"function": {"name": "get", "arguments": {"city": "Rome"}}},
                        {"name": "flat", "arguments": {}},  # flat form
                    ],
                },
                {"role": "tool", "content": "rain", "name": "get", "tool_call_id": "c1"},
                {"role": "assistant", "content": "It rains."},
            ],
            "tools": json.dumps([{"name": "get", "parameters": {"type": "object"}}]),
        }
    )
    call = conv.messages[1]
    assert call.content == "" and call.role == "assistant"
    assert call.tool_calls == [
        {"type": "function", "function": {"name": "get", "arguments": {"city": "Oslo"}}, "id": "c1"},
        {"type": "function", "function": {"name": "get", "arguments": {"city": "Rome"}}},
        {"type": "function", "function": {"name": "flat", "arguments": {}}},
    ]
    assert (conv.messages[2].name, conv.messages[2].tool_call_id) == ("get", "c1")
    assert conv.tools == [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("call", "field", "text"),
    [
        (
            {"function": {"name": "f", "arguments": "{bad"}},
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        (
            {"function": {"name": "f", "arguments": "[1]"}},
            "messages[1].tool_calls[0].function.arguments",
            "JSON object",
        ),
        (
            {"function": {"name": "", "arguments": {}}},
            "messages[1].tool_calls[0].function.name",
            "non-empty string",
        ),
        (
            {"type": "retrieval", "function": {"name": "f"}},
            "messages[1].tool_calls[0].type",
            "expected 'function'",
        ),
    ],
)
def test_bad_tool_calls(call, field, text):
    e = error({"messages": [CHAT[0], {"role": "assistant", "tool_calls": [call]}]})
    assert e.field == field and text in e.message


def test_tool_calls_on_a_user_message_are_rejected():
    e = error({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})
    assert e.field == "messages[0].tool_calls"


def test_per_message_train_and_weight():
    conv = convert(
        {
            "messages": [
                {"role": "user", "content": "q", "train": True},
                {"role": "assistant", "content": "a1", "weight": 0},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2", "weight": 1.0},
            ]
        }
    )
    assert [m.train for m in conv.messages] == [True, False, None, True]


@pytest.mark.parametrize(
    ("extra", "field", "text"),
    [
        ({"weight": 0.5}, "messages[1].weight", "must be 0 or 1"),
        ({"weight": "1"}, "messages[1].weight", "must be 0 or 1"),
        ({"train": "yes"}, "messages[1].train", "true or false"),
        ({"train": True, "weight": 0}, "messages[1].weight", "contradicts"),
    ],
)
def test_bad_train_flags(extra, field, text):
    e = error({"messages": [CHAT[0], {**CHAT[1], **extra}]})
    assert e.field == field and text in e.message and "train.jsonl" in str(e) and "line 7" in str(e)


@pytest.mark.parametrize(
    ("messages", "field", "text"),
    [
        ([{"role": "bot", "content": "x"}], "messages[0].role", "unknown role 'bot'; accepted: system, user"),
        ([{"content": "x"}], "messages[0].role", "missing role"),
        ([CHAT[0], {"role": "assistant", "content": 42}], "messages[1].content", "got a number (42)"),
        (
            [CHAT[0], {"role": "assistant", "content": ""}],
            "messages[1].content",
            "assistant message is empty",
        ),
        ([{"role": "user"}], "messages[0].content", "missing content"),
        ([], "messages", "conversation is empty"),
        (["hi"], "messages[0]", "must be an object"),
    ],
)
def test_bad_messages(messages, field, text):
    e = error({"messages": messages}, fmt="messages")
    assert e.field == field and text in e.message
    assert str(e).startswith(f"train.jsonl, line 7, field '{field}'")


def test_messages_column_mapping_paths_use_the_files_names():
    columns = {"messages": "chat", "role": "speaker", "content": "says"}
    conv = convert(
        {"chat": [{"speaker": "user", "says": "q"}, {"speaker": "assistant", "says": "a"}]}, columns=columns
    )
    assert roles(conv) == [("user", "q"), ("assistant", "a")]
    e = error({"chat": [{"speaker": "user", "says": 1}]}, columns=columns)
    assert e.field == "chat[0].says"


def test_tools_forms():
    schema = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    wrapped = {"type": "function", "function": schema}
    for tools in ([schema], [wrapped], json.dumps([schema]), schema):
        assert convert({"messages": CHAT, "tools": tools}).tools == [wrapped]
    assert convert({"messages": CHAT, "tools": "[]"}).tools is None
    e = error({"messages": CHAT, "tools": "[{oops"})
    assert e.field == "tools" and "not valid JSON" in e.message
    e = error({"messages": CHAT, "tools": [{"description": "no name"}]})
    assert e.field == "tools[0].name"


# ---------------------------------------------------------------------------------------------
# ShareGPT


def test_sharegpt_roles_system_function_calls_and_observations():
    conv = convert(
        {
            "system": "sys",
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
                {"from": "observation", "value": '{"y": 2}'},
                {"from": "function_call", "value": [{"name": "g", "arguments": "{}"}, {"name": "h"}]},
                {"from": "tool", "value": "ok"},
                {"from": "gpt", "value": "done"},
            ],
            "tools": '[{"name": "f", "parameters": {}}]',
        }
    )
    assert [m.role for m in conv.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert conv.messages[0].content == "sys"
    assert conv.messages[2].content == "" and conv.messages[2].tool_calls == [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    ]
    assert [c["function"]["name"] for c in conv.messages[4].tool_calls] == ["g", "h"]
    assert conv.tools == [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.mark.parametrize(
    ("turn", "field", "text"),
    [
        ({"from": "function_call", "value": "{not json"}, "conversations[1].value", "not valid JSON"),
        (
            {"from": "function_call", "value": '{"arguments": {}}'},
            "conversations[1].value[0].name",
            "non-empty",
        ),
        ({"from": "robot", "value": "x"}, "conversations[1].from", "accepted: system, human"),
        ({"from": "gpt", "value": None}, "conversations[1].value", "missing content"),
        ({"from": "gpt", "value": 3.5}, "conversations[1].value", "got a number (3.5)"),
    ],
)
def test_bad_sharegpt_turns(turn, field, text):
    e = error({"conversations": [{"from": "human", "value": "q"}, turn]})
    assert e.field == field and text in e.message


def test_sharegpt_role_and_content_mapping():
    columns = {"conversations": "dialog", "role": "who", "content": "said"}
    conv = convert(
        {"dialog": [{"who": "user", "said": "q"}, {"who": "assistant", "said": "a"}]}, columns=columns
    )
    assert roles(conv) == [("user", "q"), ("assistant", "a")]


# ---------------------------------------------------------------------------------------------
# Alpaca, prompt/completion, text, tokenized


def test_alpaca_with_input_system_and_history():
    conv = convert(
        {"instruction": "Do", "input": "this", "output": "done", "system": "S", "history": [["h1", "a1"]]}
    )
    assert roles(conv) == [
        ("system", "S"),
        ("user", "h1"),
        ("assistant", "a1"),
        ("user", "Do\n\nthis"),
        ("assistant", "done"),
    ]
    assert roles(convert({"instruction": "Do", "input": "", "output": "x"})) == [
        ("user", "Do"),
        ("assistant", "x"),
    ]


def test_alpaca_column_mapping():
    conv = convert({"question": "q", "answer": "a"}, columns={"instruction": "question", "output": "answer"})
    assert roles(conv) == [("user", "q"), ("assistant", "a")]


@pytest.mark.parametrize(
    ("row", "field", "text"),
    [
        (
            {"instruction": "q", "input": ""},
            "output",
            "missing required field 'output' (keys found: input, instruction)",
        ),
        ({"instruction": "q", "output": 5}, "output", "expected a string, got a number (5)"),
        ({"instruction": "q", "output": "  "}, "output", "output is empty"),
        ({"instruction": "", "output": "a"}, "instruction", "instruction is empty"),
        (
            {"instruction": "q", "output": "a", "history": [["only one"]]},
            "history[0]",
            "[user, assistant] pair",
        ),
        ({"instruction": "q", "output": "a", "history": [["u", None]]}, "history[0][1]", "missing"),
    ],
)
def test_bad_alpaca_rows(row, field, text):
    e = error(row)
    assert e.field == field and text in e.message and "train.jsonl, line 7" in str(e)


def test_prompt_completion_strings_and_message_lists():
    assert roles(convert({"prompt": "q", "completion": "a"})) == [("user", "q"), ("assistant", "a")]
    conv = convert(
        {
            "prompt": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "earlier"},
                {"role": "user", "content": "q2", "train": True},
            ],
            "completion": [{"role": "assistant", "content": "a"}],
        }
    )
    # The prompt part is not trained, unless a message says otherwise; the completion is left
    # to the mask options.
    assert [m.train for m in conv.messages] == [False, False, False, True, None]
    assert convert({"prompt": "q", "completion": "a"}).messages[0].train is False


def test_bad_prompt_completion():
    e = error({"prompt": "q", "completion": [{"role": "user", "content": "x"}]})
    assert e.field == "completion[0].role" and "must be assistant" in e.message
    assert error({"prompt": "q", "completion": ""}).message.startswith("completion is empty")
    assert error({"prompt": "q"}, fmt="prompt_completion").field == "completion"
    assert "a string or a list of messages" in error({"prompt": 1, "completion": "a"}).message


def test_text_documents():
    assert convert({"text": "hello"}) == TextDocument("hello")
    assert error({"text": " "}).message == "text is empty"
    assert error({"text": 3}).field == "text"


def test_tokenized_examples():
    assert convert({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}) == TokenizedExample(
        [1, 2, 3], [-100, 2, 3]
    )
    assert convert({"input_ids": [5]}) == TokenizedExample([5], None)
    e = error({"input_ids": [1, 2, 3], "labels": [1, 2]})
    assert e.field == "labels" and "has 2 labels but input_ids has 3 tokens" in e.message
    assert error({"input_ids": [1, -2]}).field == "input_ids[1]"
    assert error({"input_ids": [1, True]}).field == "input_ids[1]"
    assert error({"input_ids": [1], "labels": [-1]}).field == "labels[0]"
    assert error({"input_ids": []}).message == "input_ids is empty"


# ---------------------------------------------------------------------------------------------
# Whole datasets


def test_convert_all_collects_every_problem(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "q1", "output": "a1"}),
                '{"instruction": "broken",',
                json.dumps({"instruction": "q3"}),
                json.dumps({"instruction": "q4", "output": "a4"}),
                json.dumps({"messages": CHAT}),
                json.dumps({"foo": 1}),
            ]
        )
    )
    examples, problems = convert_all(DatasetSpec(path=str(path)))
    assert [s.location for s, _ in examples] == ["line 1", "line 4"]
    assert [(p.location, p.field) for p in problems] == [
        ("line 2", None),
        ("line 3", "output"),
        ("line 5", None),
        ("line 6", "instruction"),  # unrecognizable: converted as the file's format, which names the gap
    ]
    assert "not valid JSON" in problems[0].message
    assert "shape of 'messages'" in problems[2].message and "(line 1) is 'alpaca'" in problems[2].message


def test_convert_all_detects_per_file_and_honours_forced_format(tmp_path):
    folder = tmp_path / "mix"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "doc"}])
    write_jsonl(folder / "b.jsonl", [{"messages": CHAT}])
    examples, problems = convert_all(DatasetSpec(path=str(folder)))
    assert not problems and [type(e).__name__ for _, e in examples] == ["TextDocument", "Conversation"]

    # Forcing a format converts every row as that format.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a", "text": "t"}])
    ((source, example),) = convert_all(DatasetSpec(path=str(path), format="text"))[0]
    assert example == TextDocument("t")


def test_convert_all_rejects_unknown_column_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="unknown key.*`columns:`: questoin"):
        convert_all(DatasetSpec(path=str(path), columns={"questoin": "q"}))


# ---------------------------------------------------------------------------------------------
# Property: valid OpenAI rows survive JSON Lines and conversion unchanged

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
_turn = st.tuples(st.sampled_from(["user", "system", "tool"]), _text) | st.tuples(
    st.just("assistant"), _text.filter(lambda s: s.strip() != "")
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_turn, min_size=1, max_size=5), min_size=1, max_size=4))
def test_property_messages_round_trip_through_jsonl(conversations):
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in conversations]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(Path(tmp) / "p.jsonl", rows)
        examples, problems = convert_all(DatasetSpec(path=str(path)))
    assert not problems
    assert [roles(e) for _, e in examples] == [[tuple(t) for t in turns] for turns in conversations]
    assert [s.index for s, _ in examples] == list(range(len(rows)))


# ---------------------------------------------------------------------------------------------
# Real third-party files (skipped where absent)


def test_real_alpaca_demo_all_convert(shared_data):
    examples, problems = convert_all(DatasetSpec(path=str(shared_data / "alpaca_en_demo.json")))
    assert not problems and len(examples) == 999
    assert all(isinstance(e, Conversation) and e.messages[-1].role == "assistant" for _, e in examples)
    assert examples[998][0].location == "row 999"


def test_real_identity_all_convert(shared_data):
    examples, problems = convert_all(DatasetSpec(path=str(shared_data / "identity.json")))
    assert not problems and len(examples) == 91
    assert "{{name}}" in examples[0][1].messages[-1].content


def test_real_glaive_toolcalls(shared_data):
    examples, problems = convert_all(DatasetSpec(path=str(shared_data / "glaive_toolcall_en_demo.json")))
    assert not problems and len(examples) == 300
    convs = [e for _, e in examples]
    calls = [m for c in convs for m in c.messages if m.tool_calls]
    assert len(calls) == 211
    assert all(m.role == "assistant" and m.content == "" for m in calls)
    assert all(isinstance(m.tool_calls[0]["function"]["arguments"], dict) for m in calls)
    assert sum(m.role == "tool" for c in convs for m in c.messages) == 211
    with_tools = [c for c in convs if c.tools]
    assert len(with_tools) == 300 - 109  # 109 rows have "[]"
    assert all(t["type"] == "function" and t["function"]["name"] for c in with_tools for t in c.tools)


def test_real_c4_is_text(shared_data):
    examples, problems = convert_all(DatasetSpec(path=str(shared_data / "c4_demo.jsonl")))
    assert not problems and len(examples) == 300
    assert all(isinstance(e, TextDocument) for _, e in examples)


def test_problems_from_a_parquet_file_name_file_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "tok.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1, 2], "labels": [1]}]),
        path,
    )
    examples, problems = convert_all(DatasetSpec(path=str(path)))
    assert len(examples) == 1 and len(problems) == 1
    assert str(problems[0]).startswith(f"{path}, row 2, field 'labels': has 1 labels")
