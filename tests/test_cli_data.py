"""`exemplar data preview | validate | stats` and the config front end, as a user runs them."""

from __future__ import annotations

import json

import pytest
import yaml

from exemplar.cli import main
from exemplar.data.schema import IGNORE_INDEX
from tests.tokenizers_util import trained_tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    trained_tokenizer("bytelevel").save_pretrained(path)
    return path


def write_config(tmp_path, tokenizer, files, **extra):
    config = {
        "tokenizer": str(tokenizer),
        "chat_template": "chatml",
        "data": {"train": [{"path": str(f)} for f in files], "cache_dir": str(tmp_path / "cache")},
        "max_length": 256,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_chats(path, n=3):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preview_json_prints_one_object_per_example_in_order(tmp_path, tokenizer_dir, capsys):
    config = write_config(tmp_path, tokenizer_dir, [write_chats(tmp_path / "d.jsonl", 4)])
    assert main(["data", "preview", str(config), "--json", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    tok = trained_tokenizer("bytelevel")
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    for i, line in enumerate(lines):
        item = json.loads(line)
        assert item["index"] == i
        assert len(item["input_ids"]) == len(item["labels"])
        trained = [
            t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX
        ]
        assert tok.decode(trained) == f"answer {i}<|im_end|>"


def test_preview_plain_text_marks_trained_spans_and_special_tokens(tmp_path, tokenizer_dir, capsys):
    config = write_config(tmp_path, tokenizer_dir, [write_chats(tmp_path / "d.jsonl", 1)])
    assert main(["data", "preview", str(config), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[[answer 0⟨<|im_end|>⟩]]" in out
    assert "⟨<|im_start|>⟩" in out and "question 0⟨<|im_end|>⟩" in out


def test_validate_reports_every_bad_row_and_exits_nonzero(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": 5}]}\n'
        "{not json\n"
    )
    config = write_config(tmp_path, tokenizer_dir, [bad])
    assert main(["data", "validate", str(config)]) == 1
    captured = capsys.readouterr()
    assert "bad.jsonl, line 2, field 'messages[0].content'" in captured.err
    assert "bad.jsonl, line 3" in captured.err
    assert "Traceback" not in captured.err


def test_stats_reports_lengths_trained_share_and_drops(tmp_path, tokenizer_dir, capsys):
    data = write_chats(tmp_path / "d.jsonl", 5)
    with data.open("a") as f:
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]}
            )
        )
    config = write_config(tmp_path, tokenizer_dir, [data])
    assert main(["data", "stats", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 6 and stats["train_examples"] == 5
    assert stats["dropped"] == {"too_long": 1}
    assert 0 < stats["trained_share"] < 1
    assert sum(b["count"] for b in stats["length_histogram"]) == 5
    assert stats["assistant_turns"] == {"1": 6}


def test_config_mistakes_are_clear_messages_not_tracebacks(tmp_path, tokenizer_dir, capsys):
    config = write_config(tmp_path, tokenizer_dir, [write_chats(tmp_path / "d.jsonl")])
    assert main(["data", "stats", str(config), "--set", "train.micro_bach_size=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.micro_bach_size'" in err and "did you mean 'micro_batch_size'" in err
    assert main(["data", "stats", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["data", "stats", str(config), "--set", "chat_template=nonexistent"]) == 2
    assert "neither a built-in" in capsys.readouterr().err


def test_overrides_change_values(tmp_path, tokenizer_dir, capsys):
    config = write_config(tmp_path, tokenizer_dir, [write_chats(tmp_path / "d.jsonl", 2)])
    assert main(["data", "stats", str(config), "--json", "--set", "mask.train_on_everything=true"]) == 0
    assert json.loads(capsys.readouterr().out)["trained_share"] == 1.0


# -- the real third-party data beside the project --------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows"),
    [("alpaca_en_demo.json", 999), ("glaive_toolcall_en_demo.json", 300), ("c4_demo.jsonl", 300)],
)
def test_real_data_loads_validates_and_previews(tmp_path, shared_data, name, rows, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tokenizer": str(shared_data / "llama2-tokenizer"),
                "chat_template": "chatml",
                "data": {"train": [{"path": str(shared_data / name)}], "cache_dir": str(tmp_path / "cache")},
                "max_length": 4096,
            }
        )
    )
    assert main(["data", "validate", str(config)]) == 0
    assert f"{rows} rows in 1 file(s) checked: ok" in capsys.readouterr().out
    assert main(["data", "preview", str(config), "--json", "--limit", "0"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [item["index"] for item in items] == list(range(rows))
    kept = [item for item in items if "dropped" not in item]
    assert all(any(label != IGNORE_INDEX for label in item["labels"]) for item in kept)
    # a dropped row is {"index", "format", "dropped"}: here only rows over max_length
    assert {item["dropped"] for item in items if "dropped" in item} <= {"too_long"}
