"""`exemplar data preview`: text as the tokenizer decodes runs of tokens (the real Llama 2
SentencePiece tokenizer: spaces and Chinese whole), mask boundaries marked, and `--json` rows that
keep their position in the input, with their format, dropped or not."""

from __future__ import annotations

import json

import pytest
import yaml

from exemplar.cli import main
from exemplar.data.schema import IGNORE_INDEX


def write(tmp_path, rows: list, name: str = "d.jsonl"):
    path = tmp_path / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def config(tmp_path, tokenizer: str, files: list, **extra) -> str:
    data = {"train": [{"path": str(f)} for f in files], "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"tokenizer": tokenizer, "chat_template": "chatml", "data": data, "max_length": 64, **extra}
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> str:
    """The Llama 2 tokenizer saved once as a fast tokenizer (tokenizer.json): the shared folder holds
    only its tokenizer.model, which every load converts, seconds each. The first test below loads
    the shared folder itself, as a user's config names it."""
    from tests.tokenizers_util import llama2_tokenizer

    tokenizer = llama2_tokenizer()
    if tokenizer is None:
        pytest.skip("the Llama 2 tokenizer is not in the shared data folder")
    folder = tmp_path_factory.mktemp("llama2-fast")
    tokenizer.save_pretrained(folder)
    return str(folder)


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def test_llama2_preview_shows_spaces_and_chinese_whole_with_the_trained_run_marked(
    tmp_path, shared_data, capsys
):
    rows = [chat("Say hello in Chinese, please", "Hello there, friend: 你好，朋友 (ni hao)")]
    cfg = config(tmp_path, str(shared_data / "llama2-tokenizer"), [write(tmp_path, rows)])
    assert main(["data", "preview", cfg, "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "\ufffd" not in out
    assert "Say hello in Chinese, please⟨<|im_end|>⟩" in out
    assert "[[Hello there, friend: 你好，朋友 (ni hao)⟨<|im_end|>⟩]]" in out
    assert out.count("[[") == 1 and out.count("]]") == 1  # one trained run, its bounds visible
    assert "· messages ·" in out.splitlines()[0]


def test_json_rows_keep_their_index_and_say_why_one_is_dropped(tmp_path, llama2, capsys):
    rows = [
        chat("one", "first"),
        chat("two " * 80, "too long for max_length 64"),
        '{"messages": [{"role": "user", "content": 5}]}',
        {"messages": [{"role": "user", "content": "no reply"}]},
        chat("five", "fifth"),
    ]
    cfg = config(tmp_path, llama2, [write(tmp_path, rows)])
    assert main(["data", "preview", cfg, "--json", "--limit", "0"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [item["index"] for item in items] == [0, 1, 2, 3, 4]
    assert all(item["format"] == "messages" for item in items)
    assert items[1] == {"index": 1, "format": "messages", "dropped": "too_long"}
    assert set(items[2]) == {"index", "format", "dropped"}
    assert items[2]["dropped"].startswith("invalid: field 'messages[0].content': content must be a string")
    assert items[3]["dropped"].startswith("invalid: field 'messages': nothing to train")
    for item in (items[0], items[4]):
        assert "dropped" not in item and len(item["input_ids"]) == len(item["labels"])
        assert any(label != IGNORE_INDEX for label in item["labels"])
    assert main(["data", "preview", cfg, "--json", "--limit", "2"]) == 0
    assert [json.loads(line)["index"] for line in capsys.readouterr().out.splitlines()] == [0, 1]


def test_index_runs_on_across_files_each_with_its_format(tmp_path, llama2, capsys):
    first = write(tmp_path, [chat("a", "b"), chat("c", "d")], "chats.jsonl")
    second = write(tmp_path, [{"instruction": "e", "output": "f"}], "alpaca.jsonl")
    cfg = config(tmp_path, llama2, [first, second])
    assert main(["data", "preview", cfg, "--json", "--limit", "0"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(item["index"], item["format"]) for item in items] == [
        (0, "messages"),
        (1, "messages"),
        (2, "alpaca"),
    ]


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_text_preview_marks_an_over_long_row(tmp_path, llama2, capsys, truncation):
    rows = [chat("hi", "word " * 80)]
    cfg = config(tmp_path, llama2, [write(tmp_path, rows)], truncation=truncation)
    assert main(["data", "preview", cfg, "--no-color"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    if truncation == "drop":  # shown whole, marked
        assert "DROPPED: too_long" in head and " 64 tokens" not in head
    else:
        assert "DROPPED" not in head and " 64 tokens" in head


def test_stats_and_validate_name_the_format_of_each_file_of_a_folder(tmp_path, llama2, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder, [chat("a", "b")], "chats.jsonl")
    write(folder, [{"prompt": "p", "chosen": "c", "rejected": "r"}], "dpo.jsonl")
    cfg = config(tmp_path, llama2, [folder])
    assert main(["data", "stats", cfg]) == 0
    out = capsys.readouterr().out
    assert f"  format of {folder / 'chats.jsonl'}: messages" in out
    assert f"  format of {folder / 'dpo.jsonl'}: preference (preference rows: training on `chosen`" in out
    assert main(["data", "validate", cfg]) == 0
    out = capsys.readouterr().out
    assert (
        f"{folder / 'chats.jsonl'}: format messages" in out
        and f"{folder / 'dpo.jsonl'}: format preference" in out
    )
