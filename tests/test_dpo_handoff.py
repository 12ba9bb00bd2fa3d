"""The SFT result feeds preference tuning: an exported model folder (full, and LoRA merged) loads
into TRL's DPOTrainer as both the policy and the reference, and a few DPO steps run on
conversational preference data: the loss is finite, the policy moves, the reference does not."""

from __future__ import annotations

import math

import pytest
import torch

from tests.report_helpers import train_tiny

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
def test_an_exported_model_is_policy_and_reference_for_trl_dpo(tmp_path, method):
    trl = pytest.importorskip("trl", reason="TRL is in the `bench` extra: pip install -e '.[bench]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = {"method": method, "merge": True} if method == "lora" else {}
    summary = train_tiny(tmp_path, max_steps=2, eval_every=None, lr=1e-3, **train)
    folder = summary["outputs"]["model"]  # the full model, or the LoRA adapter merged into its base
    assert ("adapter" in summary["outputs"]) == (method == "lora")

    # The hand-off: the same folder is the starting policy and the frozen reference; the chat
    # template travels with the tokenizer saved there.
    policy = AutoModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    reference_before = {name: p.detach().clone() for name, p in reference.named_parameters()}

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        activation_checkpointing=False,  # TRL turns it on by default; a 2-layer model needs none
        max_length=64,
        seed=0,
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=preference_data(),
        processing_class=tokenizer,
    )
    trainer.train()

    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    moved = [name for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert moved, "DPO did not change the policy"
    for name, p in reference.named_parameters():
        assert torch.equal(p.detach(), reference_before[name]), f"the reference changed: {name}"
