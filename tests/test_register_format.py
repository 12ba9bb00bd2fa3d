"""`exemplar.register_format`: a row shape of the user's own trains like a built-in one, from YAML or
from Python, in worker processes too; its converter's mistakes are row errors naming the row."""

from __future__ import annotations

import json
import os

import pytest

import exemplar
from exemplar.data.formats import CONVERTERS
from exemplar.data.inspect import validate
from exemplar.data.tokenizer import load_tokenizer
from exemplar.errors import ConfigError, DataError
from tests.conftest import ASSET_TOKENIZER_DIR


def qa_to_messages(row):
    return {
        "messages": [
            {"role": "user", "content": row["q"]},
            {"role": "assistant", "content": row["a"]},
        ]
    }


def qa_to_conversation(row):
    return exemplar.Conversation(
        messages=[exemplar.Message("user", row["q"]), exemplar.Message("assistant", row["a"])]
    )


@pytest.fixture(autouse=True)
def registry():
    """Each test registers what it needs; the registry is left as the test found it."""
    before = dict(CONVERTERS)
    yield
    CONVERTERS.clear()
    CONVERTERS.update(before)


@pytest.fixture(scope="module")
def bundle():
    return load_tokenizer(exemplar.load_config({"tokenizer": str(ASSET_TOKENIZER_DIR)}))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path, path=None, num_proc=1, **spec):
    data = {"train": [{"path": str(path), **spec}]} if path else {}
    return exemplar.load_config(
        {
            "tokenizer": str(ASSET_TOKENIZER_DIR),
            "data": {**data, "num_proc": num_proc, "cache_dir": str(tmp_path / "cache")},
            "max_length": 256,
            "output_dir": str(tmp_path / "out"),
        }
    )


def tokens(prepared):
    return [(r["input_ids"], r["labels"]) for r in prepared.train]


QA = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]
AS_MESSAGES = [qa_to_messages(r) for r in QA]


@pytest.mark.parametrize("converter", [qa_to_messages, qa_to_conversation])
def test_registered_format_in_yaml_gives_the_tokens_of_the_same_messages(tmp_path, bundle, converter):
    exemplar.register_format("qa", converter)
    ours = exemplar.prepare_data(
        config(tmp_path, write_jsonl(tmp_path / "qa.jsonl", QA), format="qa"), bundle=bundle
    )
    reference = exemplar.prepare_data(
        config(tmp_path, write_jsonl(tmp_path / "m.jsonl", AS_MESSAGES)), bundle=bundle
    )
    assert tokens(ours) == tokens(reference)


def test_registered_format_with_data_in_memory(tmp_path, bundle):
    exemplar.register_format("qa", qa_to_messages)
    ours = exemplar.prepare_data(config(tmp_path), bundle=bundle, train_data=QA, data_format="qa")
    reference = exemplar.prepare_data(config(tmp_path), bundle=bundle, train_data=AS_MESSAGES)
    assert tokens(ours) == tokens(reference)


def test_a_registered_format_is_not_cached(tmp_path, bundle):
    exemplar.register_format("qa", qa_to_messages)
    cfg = config(tmp_path, write_jsonl(tmp_path / "qa.jsonl", QA), format="qa")
    exemplar.prepare_data(cfg, bundle=bundle, progress=False)
    exemplar.register_format(
        "qa", lambda row: qa_to_messages({"q": row["q"], "a": row["a"].upper()}), replace=True
    )
    again = exemplar.prepare_data(cfg, bundle=bundle, progress=False)
    assert not again.reports[0].cached
    assert bundle.tokenizer.decode(again.train[0]["input_ids"]).count("ANSWER 0") == 1


def test_built_in_names_are_refused_unless_replaced(tmp_path, bundle):
    with pytest.raises(ValueError, match="'alpaca' is a built-in format; pass replace=True"):
        exemplar.register_format("alpaca", qa_to_messages)
    exemplar.register_format("qa", qa_to_messages)
    with pytest.raises(ValueError, match="'qa' is already registered"):
        exemplar.register_format("qa", qa_to_conversation)
    for bad in ("auto", "", " qa"):
        with pytest.raises(ValueError, match="format name"):
            exemplar.register_format(bad, qa_to_messages)
    with pytest.raises(TypeError, match="must be callable"):
        exemplar.register_format("other", "not a function")
    exemplar.register_format(
        "alpaca", lambda row: qa_to_messages({"q": row["instruction"], "a": "42"}), replace=True
    )
    rows = [{"instruction": "What is six times seven?", "output": "ignored"}]
    prepared = exemplar.prepare_data(
        config(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca"), bundle=bundle
    )
    assert "42" in bundle.tokenizer.decode(prepared.train[0]["input_ids"])
    with pytest.raises(ValueError, match="built in"):
        exemplar.unregister_format("alpaca")
    exemplar.unregister_format("qa")
    with pytest.raises(ConfigError, match="unknown format 'qa'.*register_format"):
        config(tmp_path, tmp_path / "qa.jsonl", format="qa")


def test_converter_mistakes_are_row_errors_naming_file_row_and_field(tmp_path, bundle):
    def strict(row):
        if row.get("bad") == "value":
            raise ValueError("bad must not be 'value'")
        if row.get("bad") == "type":
            return ["not", "a", "record"]
        if row.get("bad") == "record":
            return {"messages": [{"role": "robot", "content": "x"}]}
        return qa_to_messages(row)

    exemplar.register_format("strict", strict)
    rows = [QA[0], {"q": "no answer"}, {"bad": "value"}, {"bad": "type"}, {"bad": "record"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    result = validate(config(tmp_path, path, format="strict"), bundle=bundle)
    assert result.rows == 5
    found = [(p.file, p.location, p.field) for p in result.problems]
    assert found == [
        (str(path), "line 2", "a"),
        (str(path), "line 3", None),
        (str(path), "line 4", None),
        (str(path), "line 5", "messages[0].role"),
    ]
    messages = [p.message for p in result.problems]
    assert "missing field 'a' (keys found: q)" in messages[0]
    assert "ValueError: bad must not be 'value'" in messages[1]
    assert "returned list" in messages[2]
    assert "format 'strict' returned" in messages[3] and "unknown role 'robot'" in messages[3]
    with pytest.raises(DataError, match="4 invalid rows") as raised:
        exemplar.prepare_data(config(tmp_path), bundle=bundle, train_data=rows, data_format="strict")
    assert [(p.file, p.location) for p in raised.value.problems][0] == ("<train_data>", "row 2")


def test_a_converter_bug_propagates_as_itself(tmp_path, bundle):
    exemplar.register_format("buggy", lambda row: row.nope())
    with pytest.raises(AttributeError):
        exemplar.prepare_data(config(tmp_path), bundle=bundle, train_data=QA, data_format="buggy")


def test_registered_format_in_worker_processes_matches_one_process(tmp_path, bundle):
    exemplar.register_format("qa", qa_to_messages)
    rows = [
        {"q": f"question {i}", "a": f"answer {i % 97}"} for i in range(4200)
    ]  # above the parallel threshold
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    one = exemplar.prepare_data(config(tmp_path, path, format="qa"), bundle=bundle, progress=False)
    parent = os.getpid()

    def in_a_worker(row):  # proves the rows are converted in worker processes
        if os.getpid() == parent:
            raise ValueError("converted in the parent process")
        return qa_to_messages(row)

    exemplar.register_format("qa_in_workers", in_a_worker)
    workers = config(tmp_path, path, num_proc=2, format="qa_in_workers")
    two = exemplar.prepare_data(workers, bundle=bundle, progress=False)
    assert len(one.train) == 4200 and tokens(two) == tokens(one)


def self_instruct(row):
    """The self-instruct seed tasks: an instruction with instances of input and output."""
    instance = row["instances"][0]
    prompt = f"{row['instruction']}\n\n{instance['input']}".strip()
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": instance["output"]},
        ]
    }


def test_a_registered_format_reads_real_data_and_round_trips_through_records(tmp_path, bundle, shared_data):
    from exemplar.data.convert import convert

    exemplar.register_format("self_instruct", self_instruct)
    original = config(tmp_path, shared_data / "seed_tasks.jsonl", format="self_instruct")
    prepared = exemplar.prepare_data(original, bundle=bundle, progress=False)
    assert prepared.reports[0].rows == 175 and not prepared.reports[0].cached
    result = convert(original, tmp_path / "records.jsonl")
    assert result.ok and result.written == 175
    from_records = exemplar.prepare_data(
        config(tmp_path, tmp_path / "records.jsonl"), bundle=bundle, progress=False
    )
    assert tokens(from_records) == tokens(prepared)
