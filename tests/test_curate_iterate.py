"""`exemplar curate iterate`: two rounds of sample (best-of-K, verified), fine-tune, evaluate on a
tiny model taught a few answers, and the resume at the last finished step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from exemplar.cli import main
from exemplar.model import save_model
from tests.generation_helpers import TAUGHT, taught_model

pytestmark = pytest.mark.usefixtures("one_thread")  # about 12 s on a quiet 2-core CPU

VERIFIER = "verifier:tests.test_curate_best_of_k:correct"


@pytest.fixture(scope="module")
def start_model(tokenizer, im_end, tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture: tiny models are faster so
    try:
        model = taught_model(tokenizer)
    finally:
        torch.set_num_threads(threads)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("start"), stop_token_ids=[im_end])["model"]


def write_config(folder: Path, model: Path) -> Path:
    rows = "".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in TAUGHT.items()
    )
    (folder / "prompts.jsonl").write_text(rows)
    (folder / "heldout.jsonl").write_text(rows)
    config = {
        "model": {"path": str(model)},
        "max_length": 64,
        "data": {"cache_dir": str(folder / "cache"), "num_proc": 1},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-4, "warmup_steps": 0},
        "output_dir": str(folder / "runs"),
        "curate": {
            "iterate": {
                "prompts": "prompts.jsonl",
                "heldout": "heldout.jsonl",
                "scorer": VERIFIER,
                "k": 2,
                "max_new_tokens": 8,
                "batch_size": 4,
            }
        },
    }
    path = folder / "iterate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_rounds_keep_each_round_and_resume_at_the_last_finished_step(start_model, tmp_path, capsys):
    config = write_config(tmp_path, start_model)
    assert main(["curate", "iterate", str(config), "--rounds", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    runs = tmp_path / "runs"
    rounds = [json.loads((runs / f"round-{r}" / "round.json").read_text()) for r in (1, 2)]
    assert rounds[0]["model_in"] == str(start_model)
    assert rounds[1]["model_in"] == rounds[0]["model_out"] == str(runs / "round-1" / "train" / "model")
    assert rounds[1]["model_out"] == str(runs / "round-2" / "train" / "model")
    for r, result in enumerate(rounds, start=1):
        folder = runs / f"round-{r}"
        kept = [json.loads(line) for line in (folder / "data" / "kept.jsonl").read_text().splitlines()]
        assert kept and all(
            row["messages"][-1]["content"] == TAUGHT[row["messages"][0]["content"]] for row in kept
        )
        assert result["data"]["pass_rate"]["k"] == 2 and result["data"]["kept"] == len(kept)
        assert (folder / "train" / "model" / "config.json").is_file()
        assert (folder / "eval" / "eval.md").is_file()
        before, after = result["eval"]
        assert before == ("start" if r == 1 else f"round-{r - 1}") and after == f"round-{r}"
        assert result["eval"][after]["exact_match"] is not None
    # Round 2 sampled with other seeds than round 1.
    seeds = [
        {
            json.loads(line)["meta"]["best_of_k"]["seed"]
            for line in (runs / f"round-{r}" / "data" / "kept.jsonl").open()
        }
        for r in (1, 2)
    ]
    assert not seeds[0] & seeds[1]
    assert printed.count("\n| ") >= 3 and "| 2 |" in printed  # the table: header and two rounds

    # Resume: round 2 lost its evaluation and its round.json; only the evaluation is redone.
    trained = (runs / "round-2" / "train" / "train_summary.json").stat().st_mtime_ns
    (runs / "round-2" / "round.json").unlink()
    shutil.rmtree(runs / "round-2" / "eval")
    assert main(["curate", "iterate", str(config), "--rounds", "2", "--no-progress"]) == 0
    assert "round 1: finished earlier" in capsys.readouterr().err
    assert (runs / "round-2" / "train" / "train_summary.json").stat().st_mtime_ns == trained
    assert json.loads((runs / "round-2" / "round.json").read_text())["eval"] == rounds[1]["eval"]
