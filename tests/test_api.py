"""The Python API a user lives in: `import exemplar` is cheap and complete, the README's example
runs as written, and `finetune` takes rows, a model, a tokenizer and callbacks from Python."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import exemplar
from exemplar.data.formats import CONVERTERS
from exemplar.errors import ConfigError, DataError
from exemplar.quickstart import tokenizer_path
from tests.train_helpers import TINY_LLAMA

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = TINY_LLAMA
ROWS = [
    {"instruction": f"Reverse: {w}", "output": w[::-1]}
    for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
]

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_import_exemplar_is_cheap_and_gives_the_entry_points():
    code = (
        "import sys, exemplar\n"
        "names = ['load_config', 'prepare_data', 'finetune', 'register_format', 'read_conversations',"
        " 'to_record', 'write_records', 'Conversation', 'Message']\n"
        "assert all(callable(getattr(exemplar, n)) for n in names)\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_python_api_section_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks("Python API")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    registered = dict(CONVERTERS)
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    finally:  # the example registers a format: leave the registry as it was
        CONVERTERS.clear()
        CONVERTERS.update(registered)
    out = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"step (\d+): loss", out)] == [1, 2, 3, 4]
    assert (
        "saved runs/from-a-list/checkpoints/step-000002" in out
        and "7 {'path': 'rows.jsonl', 'row': 1}" in out
    )
    summary = json.loads((tmp_path / "runs/from-a-list/train_summary.json").read_text())
    assert summary["steps"] == 4 and summary == json.loads(json.dumps(namespace["summary"]))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "runs/from-a-list/model") is not None
    assert len(namespace["prepared"].train) == 1  # the registered format's one row


def config_dict(tmp_path, **train):
    return {
        "model": {"from_config": TINY},
        "tokenizer": tokenizer_path(),
        "chat_template": "chatml",
        "max_length": 64,
        "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-3, **train},
        "output_dir": str(tmp_path / "out"),
    }


def test_finetune_with_a_given_model_tokenizer_eval_data_and_callbacks(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    tokenizer.chat_template = None  # the config's chat_template is applied to a given tokenizer
    config = config_dict(tmp_path, save_every=2, eval_every=2)
    del config["tokenizer"], config["model"]
    model = AutoModelForCausalLM.from_config(_llama(len(tokenizer) - 8))  # fewer rows than the tokenizer
    events = []
    summary = exemplar.finetune(
        config,
        train_data=datasets.Dataset.from_list(ROWS),
        eval_data=ROWS[:2],
        model=model,
        tokenizer=tokenizer,
        callbacks=[lambda event, payload: events.append((event, payload.get("step", payload.get("steps"))))],
        progress=False,
    )
    assert events == [
        ("step_end", 1),
        ("step_end", 2),
        ("eval", 2),
        ("checkpoint", 2),
        ("step_end", 3),
        ("eval", 3),
        ("checkpoint", 3),
        ("end", 3),
    ]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # resized to the tokenizer
    saved = AutoTokenizer.from_pretrained(summary["outputs"]["model"])
    assert "<|im_start|>" in saved.chat_template
    written = json.loads((tmp_path / "out/train_summary.json").read_text())
    assert written["steps"] == 3 and written["outputs"] == summary["outputs"]
    assert written["data"][0][0] == "<train_data>: 6 rows, 6 kept"


def _llama(vocab):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    return LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"} | {"vocab_size": vocab})


def test_a_user_registered_format_trains(tmp_path):
    def qa(row):
        return exemplar.Conversation(
            [exemplar.Message("user", row["question"]), exemplar.Message("assistant", row["answer"])]
        )

    exemplar.register_format("qa_for_training", qa)
    try:
        rows = [{"question": r["instruction"], "answer": r["output"]} for r in ROWS]
        path = tmp_path / "qa.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = config_dict(tmp_path)
        config["data"] = {"train": [{"path": str(path), "format": "qa_for_training"}]}
        summary = exemplar.finetune(exemplar.load_config(config), progress=False)
    finally:
        exemplar.unregister_format("qa_for_training")
    assert summary["steps"] == 3 and summary["trained_tokens"] > 0


def test_in_memory_rows_give_the_tokens_of_the_same_rows_in_a_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    from_file = exemplar.prepare_data(
        {**config_dict(tmp_path), "data": {"train": [str(path)], "cache_dir": str(tmp_path)}}
    )
    conversations = list(
        exemplar.read_conversations(
            exemplar.load_config({**config_dict(tmp_path), "data": {"train": [str(path)]}})
        )
    )
    as_messages = [exemplar.to_record(c)["messages"] for c in conversations]
    for data in (ROWS, datasets.Dataset.from_list(ROWS), conversations, as_messages, iter(ROWS)):
        prepared = exemplar.prepare_data(config_dict(tmp_path), train_data=data)
        assert prepared.train["input_ids"] == from_file.train["input_ids"]
        assert prepared.train["labels"] == from_file.train["labels"]


def test_in_memory_errors_name_the_row_and_field(tmp_path):
    rows = [ROWS[0], {"instruction": "no output"}, "not a row"]
    with pytest.raises(DataError) as raised:
        exemplar.prepare_data(config_dict(tmp_path), train_data=rows)
    assert [str(p) for p in raised.value.problems] == [
        "<train_data>, row 2, field 'output': missing required field 'output' (keys found: instruction); if "
        "the file names it differently, map it with `columns:`, e.g. columns: {output: your_name}",
        "<train_data>, row 3: expected a row dict, a Conversation or a list of messages, got a string",
    ]
    with pytest.raises(DataError, match="eval_data must be a list of row dicts"):
        exemplar.prepare_data(config_dict(tmp_path), train_data=ROWS, eval_data="dev.jsonl")
    with pytest.raises(DataError, match=r"is a DatasetDict: pass one split, e.g. data\['train'\]"):
        exemplar.prepare_data(
            config_dict(tmp_path), train_data=datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS))
        )
    with pytest.raises(ConfigError, match="no training data"):
        exemplar.prepare_data(config_dict(tmp_path))
    with pytest.raises(ConfigError, match="unknown format 'qna'"):
        exemplar.prepare_data(config_dict(tmp_path), train_data=ROWS, data_format="qna")


def test_load_config_takes_a_dict_and_leaves_it_unchanged():
    given = {"tokenizer": "t", "train": {"lr": 1e-4}}
    config = exemplar.load_config(given, ["train.lr=2e-4"])
    assert config.train.lr == 2e-4 and given == {"tokenizer": "t", "train": {"lr": 1e-4}}
    assert config.data.train == []
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        exemplar.load_config({"train": {"lrr": 1}})
