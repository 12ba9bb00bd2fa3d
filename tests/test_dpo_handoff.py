"""The SFT result feeds preference tuning: the README's "After SFT: DPO" code, as written, takes an
exported model folder (full, and LoRA merged) as both the policy and the reference of TRL's
DPOTrainer and runs a few steps on conversational preference data: the loss is finite, the
policy moves, the reference does not."""

from __future__ import annotations

import math

import pytest
import torch

from exemplar.config import load_config
from exemplar.train.finetune import finetune
from tests.report_helpers import run_config
from tests.test_api import python_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("Reverse: abc", "cba", "abc"),
    ("Reverse: xyz", "zyx", "xyz"),
    ("Reverse: hello", "olleh", "hello"),
    ("Reverse: tuv", "vut", "tvu"),
]


def preference_data():
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            for prompt, chosen, rejected in PAIRS
        ]
    )


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_readme_dpo_hand_off_trains_an_exported_model_against_itself(tmp_path, monkeypatch, method):
    pytest.importorskip("trl", reason="TRL is in the `bench` extra: pip install -e '.[bench]'")
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # the README's paths are relative: runs/my-run/model
    config = run_config(tmp_path, max_steps=2, eval_every=None, lr=1e-3)
    config["output_dir"] = "runs/my-run"
    if method == "lora":
        config["train"].update(method="lora", merge=True)
    summary = finetune(load_config(None, **config), progress=False)
    assert summary["outputs"]["model"] == "runs/my-run/model"  # the full model, or the merged LoRA
    assert ("adapter" in summary["outputs"]) == (method == "lora")

    (block,) = python_blocks("After SFT: DPO")
    namespace = {"__name__": "readme", "preferences": preference_data()}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code

    trainer = namespace["trainer"]
    assert trainer.state.global_step >= 2
    assert all(math.isfinite(row["train_loss"]) for row in trainer.state.log_history if "train_loss" in row)
    sft = dict(AutoModelForCausalLM.from_pretrained("runs/my-run/model").named_parameters())
    moved = [n for n, p in namespace["policy"].named_parameters() if not torch.equal(p.detach(), sft[n])]
    assert moved, "DPO did not change the policy"
    for name, p in namespace["reference"].named_parameters():
        assert torch.equal(p.detach(), sft[name]), f"the reference changed: {name}"
