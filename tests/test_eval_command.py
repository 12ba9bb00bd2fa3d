"""`exemplar eval` end to end on tiny models this module builds: a taught model against a random
base, every table column, NLL over exactly the tokens training trains, and the output files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from exemplar.cli import main
from exemplar.config import ModelConfig, TrainConfig
from exemplar.data.schema import IGNORE_INDEX
from exemplar.evaluate.evaluation import pick_shots, with_shots
from exemplar.model import load_model, save_model
from tests.generation_helpers import LLAMA, TAUGHT, taught_model

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = {**TAUGHT, "Give JSON": '{"name": "Ada"}'}


@pytest.fixture(scope="module")
def folders(tokenizer, im_end, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    tuned = save_model(taught_model(tokenizer, ANSWERS), tokenizer, root / "tuned", [im_end])["model"]
    torch.manual_seed(1)
    random_init = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    base = save_model(random_init, tokenizer, root / "base", [im_end])["model"]
    heldout = root / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in ANSWERS.items()
        )
    )
    general = root / "general.txt"
    general.write_text("The cat sat on the mat.\nRivers run to the sea.\n")
    return {"tuned": tuned, "base": base, "heldout": heldout, "general": general, "root": root}


@pytest.fixture(scope="module")
def result(folders, tmp_path_factory):
    root = folders["root"]
    (root / "checks_for_eval.py").write_text(
        "def starts_like_reference(record, response):\n"
        "    return response[:1] == record['messages'][-1]['content'][:1]\n"
    )
    schema = root / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["name"]}))
    out = tmp_path_factory.mktemp("eval_out")
    import sys

    sys.path.insert(0, str(root))
    try:
        argv = [
            "eval",
            *("--model", f"base={folders['base']}", "--model", f"tuned={folders['tuned']}"),
            *("--data", str(folders["heldout"]), "--general", str(folders["general"]), "--few-shot", "2"),
            *("--max-new-tokens", "10", "--regex", r"^[a-z]", "--json-schema", str(schema)),
            *("--verifier", "checks_for_eval:starts_like_reference", "--device", "cpu", "--out", str(out)),
        ]
        assert main(argv) == 0
    finally:
        sys.path.remove(str(root))
    return out


@pytest.mark.slow
def test_the_table_shows_base_few_shot_and_tuned(result, capsys):
    data = json.loads((result / "eval.json").read_text())
    models = data["models"]
    assert list(models) == ["base", "base+2shot", "tuned"]
    tuned, base = models["tuned"], models["base"]
    assert tuned["exact_match"] == 1.0 and base["exact_match"] == 0.0
    assert tuned["stop_rate"] == 1.0 and tuned["truncated_rate"] == 0.0
    assert tuned["nll"] < base["nll"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["nll"]))
    assert tuned["json_valid"] == 0.25 and tuned["json_schema_valid"] == 0.25  # only the JSON answer
    assert tuned["verifier"] == 1.0
    assert tuned["regex_match"] == 0.5  # "hi" and "c b a" start lowercase; "I am..." and "{..." do not
    assert tuned["mean_length"] > 0 and base["mean_length"] == 10  # the random base never stops
    for name in ("base", "tuned"):
        assert models[name]["general_nll"] > 0
    assert models["base"]["general_nll_change"] == 0.0
    assert tuned["general_nll_change"] == pytest.approx(tuned["general_nll"] - base["general_nll"])
    assert data["intervals"]["tuned"]["exact_match"] == [1.0, 1.0]
    diff = data["differences"]["tuned"]["exact_match"]
    assert diff["value"] == 1.0 and diff["against"] == "base"
    low, high = data["intervals"]["base"]["nll"]
    assert low <= base["nll"] <= high
    table = (result / "eval.md").read_text()
    assert "| tuned |" in table and "| base+2shot |" in table and "general_nll" in table


@pytest.mark.slow
def test_nll_is_over_the_tokens_training_trains(result, folders, tokenizer):
    """The answer's tokens plus the stop token, and the same loss the model's own forward gives."""
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (result / "eval_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(ANSWERS)
    tuned_rows = [r for r in rows if r["model"] == "tuned"]
    model = AutoModelForCausalLM.from_pretrained(str(folders["tuned"])).eval()
    for row, (question, answer) in zip(tuned_rows, ANSWERS.items(), strict=True):
        assert row["response"] == answer and row["reference"] == answer
        assert row["trained_tokens"] == len(tokenizer.encode(answer, add_special_tokens=False)) + 1
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=True,
            return_dict=False,
        )
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            tokenize=True,
            return_dict=False,
            add_generation_prompt=True,
        )
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) : len(prompt) + row["trained_tokens"]]
        labels += [IGNORE_INDEX] * (len(ids) - len(labels))
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        assert row["nll_sum"] / row["trained_tokens"] == pytest.approx(float(loss), rel=1e-4)


def test_few_shot_examples_never_include_the_row_answered():
    assert pick_shots(2, 4, [{}] * 4, same_as_data=True) == [[1, 2], [0, 2], [0, 1], [0, 1]]
    assert pick_shots(1, 2, [{}] * 3, same_as_data=False) == [[0], [0]]
    record = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    shot = {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]}
    assert with_shots(record, [shot])["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q0", "train": False},
        {"role": "assistant", "content": "a0", "train": False},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_bad_arguments_are_clear_errors(tokenizer, im_end, tmp_path, capsys):
    random_init = load_model(
        ModelConfig(from_config={**LLAMA, "vocab_size": len(tokenizer)}),
        TrainConfig(),
        tokenizer,
        device="cpu",
    )
    base = save_model(random_init, tokenizer, tmp_path / "base", [im_end])["model"]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n"
    )
    heldout = str(heldout)
    assert main(["eval", "--model", "nameless", "--data", heldout, "--out", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert (
        main(["eval", "--model", f"x={tmp_path / 'missing'}", "--data", heldout, "--out", str(tmp_path)]) == 2
    )
    assert "is not a model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    assert main(["eval", "--model", f"b={base}", "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "row 1" in capsys.readouterr().err
