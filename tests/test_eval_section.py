"""The `eval:` section of a training config: run at the end of `exemplar train` (and `finetune`) on
the exported model, with the config's model.path as the base; written to OUTPUT/eval/ and shown in
the run's report. Every mistake in the section stops the run at config load, before any training,
and an evaluation that fails after training keeps the model, the summary and the report."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from exemplar.cli import main
from exemplar.config import ModelConfig, TrainConfig, load_config
from exemplar.errors import ConfigError
from exemplar.model import load_model, save_model
from exemplar.quickstart import tokenizer_path
from exemplar.train.finetune import finetune
from tests.report_helpers import TINY_LLAMA, Page, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")

VISIBLE = ("nll", "perplexity", "token_accuracy", "exact_match", "stop_rate", "mean_length", "general_nll")


@pytest.fixture(scope="module")
def base_folder(tokenizer, im_end, tmp_path_factory) -> Path:
    """A random-init model folder: the run's model.path, so the default base row."""
    import torch

    torch.manual_seed(0)
    model = load_model(ModelConfig(from_config=TINY_LLAMA), TrainConfig(), tokenizer, device="cpu")
    return save_model(model, tokenizer, tmp_path_factory.mktemp("base"), [im_end])["model"]


def run_config(folder: Path, model_path: Path, /, **eval_section) -> dict:
    """A quickstart-like run: reversal rows, a few steps; held-out rows are training rows, so the
    trained model's NLL on them falls below the base's."""
    train = write_rows(folder / "train.jsonl", 12)
    heldout = write_rows(folder / "heldout.jsonl", 4)
    (folder / "general.txt").write_text("The cat sat on the mat.\nRivers run to the sea.\n")
    section = {
        "data": str(heldout),
        "general": str(folder / "general.txt"),
        "max_new_tokens": 6,
        "device": "cpu",
    }
    return {
        "model": {"path": str(model_path)},
        "tokenizer": tokenizer_path(),
        "data": {"train": [{"path": str(train)}], "cache_dir": str(folder / "cache")},
        "max_length": 64,
        "train": {"micro_batch_size": 4, "max_steps": 6, "lr": 3e-3},
        "output_dir": str(folder / "out"),
        "eval": {**section, **eval_section},
    }


def write_yaml(folder: Path, config: dict) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(base_folder, tmp_path_factory):
    """`exemplar train run.yaml` with an eval: section (a relative general-text path, 1 shot)."""
    folder = tmp_path_factory.mktemp("run")
    section = {"few_shot": 1, "regex": r"^\d", "general": "general.txt"}  # relative to the YAML's folder
    config = write_yaml(folder, run_config(folder, base_folder, **section))
    assert main(["train", str(config)]) == 0
    return folder / "out"


def test_training_ends_with_the_evaluation_of_the_exported_model(trained):
    files = {p.name for p in (trained / "eval").iterdir()}
    assert {"eval.json", "eval_examples.jsonl", "eval.md"} <= files
    result = json.loads((trained / "eval" / "eval.json").read_text())
    models = result["models"]
    assert list(models) == ["base", "base+1shot", "tuned"]
    for name in ("base", "tuned"):
        assert set(VISIBLE) <= set(models[name]), name
    assert models["tuned"]["nll"] < models["base"]["nll"]
    assert models["base"]["exact_match"] == 0.0
    assert "regex_match" in models["tuned"]  # the section's options reach the evaluation
    assert result["settings"]["few_shot"] == 1 and result["settings"]["max_new_tokens"] == 6
    assert result["settings"]["general"].endswith("general.txt")  # resolved from the config's folder
    rows = [json.loads(line) for line in (trained / "eval" / "eval_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and {r["model"] for r in rows} == set(models)
    assert (trained / "eval" / "eval.md").read_text() == result["table"]


def test_the_summary_and_the_report_carry_the_evaluation(trained):
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["outputs"]["eval"] == str(trained / "eval" / "eval.json")
    assert list(summary["eval"]["models"]) == ["base", "base+1shot", "tuned"]
    text = Page((trained / "report.html").read_text()).text("evaluation")
    assert "eval/eval.json" in text and "No evaluation" not in text
    for needle in ("base+1shot", "tuned", "exact_match", "general_nll"):
        assert needle in text


def test_the_library_call_runs_the_section_and_logs_the_table(base_folder, tmp_path, caplog):
    config = run_config(tmp_path, base_folder, base=False, name="mine", max_new_tokens=4)
    config["train"]["max_steps"] = 2
    with caplog.at_level(logging.INFO, logger="exemplar"):
        summary = finetune(config, progress=False)
    assert list(summary["eval"]["models"]) == ["mine"]  # base: false leaves the base out
    assert "| mine |" in caplog.text


def test_a_failing_evaluation_keeps_the_model_summary_and_report(base_folder, tmp_path, capsys):
    (tmp_path / "failing_check.py").write_text("def check(record, response):\n    raise RuntimeError('no')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        config = run_config(tmp_path, base_folder, base=False, verifier="failing_check:check")
        config["train"]["max_steps"] = 1
        assert main(["train", str(write_yaml(tmp_path, config))]) == 2
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("failing_check", None)
    err = capsys.readouterr().err
    assert "the eval: section failed after training" in err and "the model is saved" in err
    out = tmp_path / "out"
    assert (out / "model" / "config.json").is_file() and (out / "report.html").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert "verifier failed" in summary["eval_error"] and "eval" not in summary["outputs"]


BAD_SECTIONS = {
    "missing_data": ({"data": "nowhere.jsonl"}, "eval.data: "),
    "unknown_key": ({"few_shots": 2}, "unknown key 'eval.few_shots' (did you mean 'few_shot'?)"),
    "negative_shots": ({"few_shot": -1}, "eval.few_shot"),
    "bad_regex": ({"regex": "(unclosed"}, "not a valid regular expression"),
    "verifier": ({"verifier": "no_such_module_here:check"}, "eval.verifier: "),
    "verifier_form": ({"verifier": "just_a_name"}, "module:function"),
    "schema_not_json": ({"json_schema": "train.jsonl"}, "eval.json_schema: "),
    "schema_invalid": ({"json_schema": "schema.json"}, "not a valid JSON schema"),
    "base_missing": ({"base": "no_such_folder"}, "eval.base"),
    "other_model": ({"models": {"other": "no_such_folder"}}, "eval.models.other"),
    "duplicate_name": ({"name": "base"}, "must be unique"),
    "reference": ({"reference": "nobody"}, "eval.reference: 'nobody'"),
    "shots_without_base": ({"base": False, "few_shot": 1}, "eval.few_shot: the few-shot row is the base"),
    "judge": ({"judge": "judge"}, "eval.judge"),
    "lm_eval_task": ({"lm_eval_tasks": ["missing.yaml"]}, "eval.lm_eval_tasks"),
    "temperature": ({"max_new_tokens": 0}, "eval.max_new_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_SECTIONS))
def test_a_bad_section_stops_the_run_before_any_training(case, base_folder, tmp_path, capsys):
    section, message = BAD_SECTIONS[case]
    (tmp_path / "schema.json").write_text(json.dumps({"type": "no-such-type"}))
    config = write_yaml(tmp_path, run_config(tmp_path, base_folder, **section))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_sections_that_cannot_be_evaluated_are_refused_at_load(base_folder, tmp_path):
    config = run_config(tmp_path, base_folder, few_shot=2)
    config["model"] = {"from_config": TINY_LLAMA}  # a random init has no folder: no base row
    with pytest.raises(ConfigError, match="few_shot: the few-shot row is the base"):
        load_config(None, **config)
    config = run_config(tmp_path, base_folder)
    config["train"]["method"] = "lora"
    with pytest.raises(ConfigError, match="set train.merge: true"):
        load_config(None, **config)
    config["train"]["merge"] = True
    assert load_config(None, **config).eval.name == "tuned"
