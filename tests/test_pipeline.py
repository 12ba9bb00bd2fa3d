"""The data pipeline end to end: files in, cached (input_ids, labels) out, with a drop report."""

from __future__ import annotations

import json

import pytest

from exemplar.config import load_config
from exemplar.data.pipeline import prepare_data
from exemplar.data.schema import IGNORE_INDEX
from exemplar.data.tokenizer import prepare_tokenizer
from exemplar.errors import DataError
from tests.tokenizers_util import trained_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def bundle():
    return prepare_tokenizer(trained_tokenizer("bytelevel"), "chatml")


def config_for(tmp_path, files, **extra):
    data = {"train": [{"path": str(f)} for f in files]}
    data.update(extra.pop("data", {}))
    return load_config(
        None,
        extra.pop("overrides", []),
        tokenizer="unused",
        data={**data, "cache_dir": str(tmp_path / "cache")},
        output_dir=str(tmp_path / "out"),
        **extra,
    )


def test_rows_are_encoded_with_labels_and_drops_are_counted(tmp_path, bundle):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(10)]
    rows.append(chat("long " * 300, "x"))  # over max_length: dropped and counted
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "no", "train": False},
            ]
        }
    )
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = config_for(tmp_path, [path], max_length=128)
    # A row with nothing to train is invalid (validate names it); skip_invalid skips and counts it.
    with pytest.raises(DataError, match="line 12, field 'messages': nothing to train"):
        prepare_data(config, bundle=bundle, progress=False)
    config.data.skip_invalid = True
    prepared = prepare_data(config, bundle=bundle, progress=False)
    assert len(prepared.train) == 10
    (report,) = prepared.reports
    assert report.rows == 11 and report.kept == 10 and report.invalid == 1
    assert report.dropped == {"too_long": 1}
    row = prepared.train[0]
    assert len(row["input_ids"]) == len(row["labels"])
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert bundle.tokenizer.decode(trained) == "answer 0<|im_end|>"
    assert prepared.stop_token_ids == [
        bundle.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bundle.tokenizer.eos_token_id,
    ]


def test_truncate_policy_keeps_examples_with_trained_tokens_left(tmp_path, bundle):
    rows = [chat("short", "long answer " * 50), chat("long prompt " * 80, "late answer")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = config_for(tmp_path, [path], max_length=64, truncation="truncate")
    prepared = prepare_data(config, bundle=bundle, progress=False)
    assert len(prepared.train) == 1 and len(prepared.train[0]["input_ids"]) == 64
    assert prepared.reports[0].dropped == {"no_trained_tokens_after_truncation": 1}


def test_cache_hits_and_misses_on_any_changed_option(tmp_path, bundle):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(5)])
    first = prepare_data(config_for(tmp_path, [path]), bundle=bundle, progress=False)
    again = prepare_data(config_for(tmp_path, [path]), bundle=bundle, progress=False)
    assert not first.reports[0].cached and again.reports[0].cached
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.train["labels"] == first.train["labels"]

    changed = [
        config_for(tmp_path, [path], max_length=1024),
        config_for(tmp_path, [path], overrides=["mask.train_on_everything=true"]),
        config_for(tmp_path, [path], truncation="truncate"),
    ]
    for config in changed:
        assert not prepare_data(config, bundle=bundle, progress=False).reports[0].cached

    other_template = prepare_tokenizer(trained_tokenizer("bytelevel"), "zephyr")
    assert (
        not prepare_data(config_for(tmp_path, [path]), bundle=other_template, progress=False)
        .reports[0]
        .cached
    )

    write_jsonl(path, [chat(f"q{i}", f"b{i}") for i in range(5)])  # same size, new content
    assert not prepare_data(config_for(tmp_path, [path]), bundle=bundle, progress=False).reports[0].cached


def test_weights_and_held_out_fraction(tmp_path, bundle):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", f"x{i}") for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"b{i}", f"y{i}") for i in range(10)])
    config = load_config(
        None,
        tokenizer="unused",
        data={
            "train": [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}],
            "cache_dir": str(tmp_path / "c"),
        },
    )
    prepared = prepare_data(config, bundle=bundle, progress=False)
    assert len(prepared.train) == 20 + 5

    config = load_config(
        None,
        tokenizer="unused",
        data={"train": [str(a)], "eval_fraction": 0.2, "cache_dir": str(tmp_path / "c")},
    )
    prepared = prepare_data(config, bundle=bundle, progress=False)
    assert len(prepared.train) == 8 and len(prepared.eval) == 2
    train_rows = {tuple(r) for r in prepared.train["input_ids"]}
    assert not train_rows & {tuple(r) for r in prepared.eval["input_ids"]}


def test_invalid_rows_stop_preparation_with_locations(tmp_path, bundle):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(chat("q", "a")) + "\n" + '{"messages": [{"role": "wizard", "content": "x"}]}\n'
    )
    with pytest.raises(DataError) as err:
        prepare_data(config_for(tmp_path, [path]), bundle=bundle, progress=False)
    assert "bad.jsonl" in str(err.value) and "line 2" in str(err.value)


def test_invalid_rows_found_by_worker_processes_keep_their_locations(tmp_path, bundle):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(4200)]
    rows[4150] = {"messages": [{"role": "wizard", "content": "x"}]}  # in the second worker's share
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_data(config_for(tmp_path, [path], data={"num_proc": 2}), bundle=bundle, progress=False)
    (problem,) = err.value.problems
    assert (problem.file, problem.location) == (str(path), "line 4151")
    assert "wizard" in problem.message and "line 4151" in str(err.value)


def test_parallel_encoding_matches_single_process(tmp_path, bundle):
    rows = [chat(f"question number {i}", f"answer number {i} " * (i % 7 + 1)) for i in range(4200)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    single = prepare_data(
        config_for(tmp_path, [path], data={"num_proc": 1}), bundle=bundle, use_cache=False, progress=False
    )
    multi = prepare_data(
        config_for(tmp_path, [path], data={"num_proc": 2}), bundle=bundle, use_cache=False, progress=False
    )
    assert single.train["input_ids"] == multi.train["input_ids"]
    assert single.train["labels"] == multi.train["labels"]
