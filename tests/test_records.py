"""Conversation records: every format converts to the one record shape, the record trains to the
same tokens as the original, converting a record file again changes nothing, and `meta.source`
points at the row that `exemplar data validate` would name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.data.convert import convert
from exemplar.data.formats import detect_format, to_example
from exemplar.data.pipeline import prepare_data
from exemplar.data.records import to_record
from exemplar.data.schema import SourceRow
from exemplar.data.sources import read_conversations
from exemplar.data.tokenizer import load_tokenizer
from tests.conftest import ASSET_TOKENIZER_DIR

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

# Rows of every built-in format, with the features each one has (tools, flags, history, ...).
ROWS = {
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "I should call the tool.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "content": '{"temp": 21}', "name": "get_weather", "tool_call_id": "c1"},
                {"role": "assistant", "content": "21 degrees.", "weight": 1},
                {"role": "user", "content": "Thanks"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "You're "}, {"type": "text", "text": "welcome."}],
                    "train": False,
                },
            ],
            "tools": TOOLS,
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]},
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                {"from": "observation", "value": '{"temp": -3}'},
                {"from": "gpt", "value": "Minus three."},
            ],
            "system": "You are a weather bot.",
            "tools": json.dumps(TOOLS),
        },
        {
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4", "weight": 0},
                {"from": "human", "value": "sure?"},
                {"from": "gpt", "value": "Yes, 4."},
            ]
        },
    ],
    "alpaca": [
        {
            "instruction": "Add",
            "input": "2 and 3",
            "output": "5",
            "system": "Math tutor.",
            "history": [["1+1?", "2"]],
        },
        {"instruction": "Say hi", "output": "hi"},
    ],
    "prompt_completion": [
        {"prompt": "The sky is", "completion": " blue."},
        {
            "prompt": [{"role": "system", "content": "Poet."}, {"role": "user", "content": "A line on rain"}],
            "completion": [{"role": "assistant", "content": "Rain writes on glass."}],
        },
    ],
    "text": [{"text": "Plain text for pre-training."}, {"text": "Another document.\nTwo lines."}],
    "tokenized": [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10, 11]}],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config_for(tmp_path, path, **data):
    return load_config(
        {
            "tokenizer": str(ASSET_TOKENIZER_DIR),
            "chat_template": "chatml",
            "data": {
                "train": [{"path": str(path), **data}],
                "num_proc": 1,
                "cache_dir": str(tmp_path / "cache"),
            },
            "max_length": 4096,
            "output_dir": str(tmp_path / "out"),
        }
    )


def token_rows(config, bundle):
    prepared = prepare_data(config, bundle=bundle, use_cache=False, progress=False)
    return [(r["input_ids"], r["labels"]) for r in prepared.train]


@pytest.fixture(scope="module")
def bundle():
    config = load_config({"tokenizer": str(ASSET_TOKENIZER_DIR), "chat_template": "chatml"})
    return load_tokenizer(config)


def assert_round_trip(tmp_path, original, bundle, **data):
    """prepare(original) == prepare(convert(original)), and convert(convert(x)) == convert(x)."""
    first, second = tmp_path / "records.jsonl", tmp_path / "again.jsonl"
    result = convert(config_for(tmp_path, original, **data), first)
    assert result.ok and result.written == result.rows
    again = convert(config_for(tmp_path, first), second)
    assert again.ok and second.read_text() == first.read_text()
    expected = token_rows(config_for(tmp_path, original, **data), bundle)
    assert expected and token_rows(config_for(tmp_path, first), bundle) == expected
    return [json.loads(line) for line in first.read_text().splitlines()]


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_round_trips_through_records_to_the_same_tokens(tmp_path, bundle, fmt):
    original = write_jsonl(tmp_path / f"{fmt}.jsonl", ROWS[fmt])
    records = assert_round_trip(tmp_path, original, bundle)
    assert [r["meta"]["source"] for r in records] == [{"path": str(original), "row": i} for i in (1, 2)]
    record_format = {"text": "text", "tokenized": "tokenized"}.get(fmt, "messages")
    assert {detect_format(r) for r in records} == {record_format}


def test_columns_mapping_round_trips(tmp_path, bundle):
    rows = [{"question": "Capital of France?", "answer": "Paris"}]
    original = write_jsonl(tmp_path / "qa.jsonl", rows)
    (record,) = assert_round_trip(
        tmp_path, original, bundle, columns={"instruction": "question", "output": "answer"}
    )
    assert record["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]


def test_record_keeps_tools_reasoning_flags_and_tool_fields(tmp_path, bundle):
    original = write_jsonl(tmp_path / "m.jsonl", ROWS["messages"][:1])
    (record,) = assert_round_trip(tmp_path, original, bundle)
    assert record["tools"] == TOOLS
    call, tool, answer, _, last = record["messages"][2:]
    assert call["reasoning_content"] == "I should call the tool." and call["content"] == ""
    assert call["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}
    ]
    assert tool == {"role": "tool", "content": '{"temp": 21}', "name": "get_weather", "tool_call_id": "c1"}
    assert answer["train"] is True and last == {
        "role": "assistant",
        "content": "You're welcome.",
        "train": False,
    }


def test_prompt_messages_of_a_completion_dataset_are_recorded_untrained(tmp_path, bundle):
    original = write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"][:1])
    (record,) = assert_round_trip(tmp_path, original, bundle)
    assert record["messages"] == [
        {"role": "user", "content": "The sky is", "train": False},
        {"role": "assistant", "content": " blue."},
    ]


def test_meta_source_row_is_the_number_validate_prints(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    good = json.dumps(ROWS["alpaca"][1])
    jsonl.write_text(f'{good}\n\n{{"instruction": "x"}}\n{good}\n')  # blank line 2, invalid line 3
    result = convert(config_for(tmp_path, jsonl), tmp_path / "out.jsonl")
    (problem,) = result.problems
    assert (problem.file, problem.location, problem.field) == (str(jsonl), "line 3", "output")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["meta"]["source"]["row"] for r in records] == [1, 4]
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(ROWS["alpaca"]))
    examples = list(read_conversations(config_for(tmp_path, as_list)))
    assert [e.meta["source"] for e in examples] == [{"path": str(as_list), "row": i} for i in (1, 2)]


def test_free_form_meta_is_kept_and_never_trained(tmp_path, bundle):
    row = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "meta": {"source": {"path": "elsewhere.json", "row": 7}, "scores": {"quality": 0.9}, "reason": None},
    }
    with_meta, without = (
        write_jsonl(tmp_path / "a.jsonl", [row]),
        write_jsonl(tmp_path / "b.jsonl", [{"messages": row["messages"]}]),
    )
    (record,) = assert_round_trip(tmp_path, with_meta, bundle)
    assert record["meta"] == row["meta"]
    assert token_rows(config_for(tmp_path, with_meta), bundle) == token_rows(
        config_for(tmp_path, without), bundle
    )


def test_a_json_file_holding_records_with_line_separators_reads_back(tmp_path, bundle):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "a\u2028b\x85c"},
                {"role": "assistant", "content": "d\u2029e"},
            ]
        }
    ]
    original = tmp_path / "sep.json"
    original.write_text(json.dumps(rows))
    first = tmp_path / "records.json"  # .json holding JSON Lines: read with str.splitlines()
    convert(config_for(tmp_path, original), first)
    assert token_rows(config_for(tmp_path, first), bundle) == token_rows(
        config_for(tmp_path, original), bundle
    )


# ---------------------------------------------------------------------------------------------
# Random conversations: row -> example -> record -> example is the identity


_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
    str.strip
)
_flag = st.sampled_from([{}, {"train": True}, {"train": False}, {"weight": 0}, {"weight": 1}])
_call = st.builds(
    lambda name, arg: {"type": "function", "function": {"name": name, "arguments": {"x": arg}}},
    st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
    _text,
)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(_text), **draw(_flag)})
        answer = {"role": "assistant", "content": draw(_text), **draw(_flag)}
        if draw(st.booleans()):
            answer["tool_calls"] = draw(st.lists(_call, min_size=1, max_size=2))
            messages.append(answer)
            messages.append({"role": "tool", "content": draw(_text), **draw(_flag)})
            answer = {"role": "assistant", "content": draw(_text)}
        if draw(st.booleans()):
            answer["reasoning_content"] = draw(_text)
        messages.append(answer)
    row = {"messages": messages}
    if draw(st.booleans()):
        row["tools"] = TOOLS
    return row


@given(conversations())
def test_random_conversations_survive_the_record_round_trip(row):
    example = to_example(SourceRow("r.jsonl", "line 1", 0, row), "auto")
    record = to_record(example, SourceRow("r.jsonl", "line 1", 0, row))
    again = to_example(SourceRow("records.jsonl", "line 1", 0, record), "auto")
    assert to_record(again) == record
    example.meta = again.meta
    assert again == example


# ---------------------------------------------------------------------------------------------
# The real data beside the project


@pytest.mark.parametrize(
    "name",
    [
        "alpaca_en_demo.json",
        "glaive_toolcall_en_demo.json",
        "identity.json",
        "c4_demo.jsonl",
        "wiki_demo.txt",
    ],
)
def test_real_data_round_trips_through_records(tmp_path, bundle, shared_data, name):
    records = assert_round_trip(tmp_path, shared_data / name, bundle)
    assert records[0]["meta"]["source"] == {"path": str(shared_data / name), "row": 1}


# ---------------------------------------------------------------------------------------------
# The command


def test_convert_command_writes_valid_rows_and_reports_invalid_ones(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [*ROWS["alpaca"], {"instruction": "no output"}])
    dev = write_jsonl(tmp_path / "dev.jsonl", ROWS["messages"][1:])
    config = {
        "tokenizer": str(ASSET_TOKENIZER_DIR),
        "data": {"train": [{"path": str(data)}], "eval": [{"path": str(dev)}]},
    }
    path = tmp_path / "config.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    out = tmp_path / "records.jsonl"
    assert main(["data", "convert", str(path), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"{data}, line 3, field 'output'" in captured.err
    assert "3 rows read, 2 records written" in captured.out and "1 invalid rows not written" in captured.out
    assert len(out.read_text().splitlines()) == 2
    assert main(["data", "convert", str(path), "--out", str(out), "--split", "eval"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["meta"]["source"] == {"path": str(dev), "row": 1}
    assert record["messages"][1] == {"role": "assistant", "content": "hello"}


def test_convert_without_datasets_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(f"tokenizer: {ASSET_TOKENIZER_DIR}\n")
    assert main(["data", "convert", str(path), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no datasets under data.train" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_the_readme_record_example_is_a_record():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Conversation records") :]
    record = json.loads(re.search(r"```json\n(.*?)```", section, flags=re.S).group(1))
    example = to_example(SourceRow("README.md", "line 1", 0, record), "auto")
    assert to_record(example) == record
