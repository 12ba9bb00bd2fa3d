"""The lm-evaluation-harness bridge (the `eval` extra), offline with a local task over a local file."""

from __future__ import annotations

import json

import pytest
import torch

from exemplar.cli import main
from exemplar.config import ModelConfig, TrainConfig
from exemplar.errors import ConfigError
from exemplar.evaluate.lm_eval_bridge import run_lm_eval, task_name
from exemplar.model import load_model, save_model
from tests.generation_helpers import LLAMA

pytest.importorskip(
    "lm_eval", reason='the lm-eval bridge needs the eval extra: pip install "exemplar-sft[eval]"'
)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_a_local_task_runs_offline_with_a_known_score(tokenizer, im_end, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    model = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    folder = save_model(model, tokenizer, tmp_path / "run", [im_end])["model"]
    # The same question twice with the same two choices, the right one different each time:
    # whatever the model prefers, exactly one of the two is right, so accuracy is exactly 0.5.
    rows = [
        {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
        {"question": "The sky is", "choices": ["blue", "green"], "answer": 1},
    ]
    data = tmp_path / "tasks" / "sky.json"
    data.parent.mkdir()
    data.write_text(json.dumps(rows))
    task = tmp_path / "tasks" / "sky.yaml"
    task.write_text(
        "task: exemplar_sky\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    assert task_name(task) == "exemplar_sky"
    metrics = run_lm_eval(folder, task, device="cpu", batch_size=2)
    assert metrics["acc,none"] == 0.5
    assert metrics["samples"] == 2
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    )
    out = tmp_path / "out"
    argv = ["eval", "--model", f"base={folder}", "--data", str(heldout), "--max-new-tokens", "2"]
    assert main([*argv, "--lm-eval-task", str(task), "--device", "cpu", "--out", str(out)]) == 0
    models = json.loads((out / "eval.json").read_text())["models"]
    assert models["base"]["lm_eval"]["exemplar_sky"]["acc,none"] == 0.5
    assert "lm-eval task exemplar_sky: acc,none 0.500" in (out / "eval.md").read_text()


def test_a_task_file_without_a_name_is_refused(tmp_path):
    task = tmp_path / "t.yaml"
    task.write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="no top-level 'task: NAME'"):
        task_name(task)
