"""Held-out likelihood on its own: the model's own mean token loss, whatever the batching."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exemplar.data.schema import IGNORE_INDEX
from exemplar.evaluate.likelihood import evaluate_rows
from exemplar.train.batch import collate_padded
from tests.train_helpers import synthetic_dataset, synthetic_examples, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = synthetic_examples(10, seed=3, min_len=3, max_len=20)


def _records():
    return [{"input_ids": ids, "labels": labels} for ids, labels in EXAMPLES]


def _reference(model):
    """transformers' own shifted mean cross-entropy and argmax accuracy over the trained labels."""
    batch = collate_padded(EXAMPLES, pad_id=0)
    with torch.no_grad():
        out = model(**batch.model_inputs(), labels=batch.labels)
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE_INDEX
    hits = out.logits[:, :-1].argmax(-1)[trained] == targets[trained]
    return float(out.loss), float(hits.float().mean()), int(trained.sum())


def test_scores_are_the_models_own_loss_and_accuracy_over_trained_tokens():
    model = tiny_model("llama").eval()
    loss, accuracy, count = _reference(model)
    result = evaluate_rows(model, _records(), micro_batch_size=3)
    assert result["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert result["eval_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["eval_token_accuracy"] == pytest.approx(accuracy)
    assert result["eval_tokens"] == count


@pytest.mark.parametrize(
    "batching",
    [
        {"packing": True, "micro_batch_size": 1},
        {"packing": True, "micro_batch_size": 4, "max_length": 24},
        {"packing": False, "micro_batch_size": 1},
        {"packing": False, "micro_batch_size": 16},
        {"packing": False, "micro_batch_size": 2, "max_tokens_per_batch": 40},
    ],
)
def test_the_scores_do_not_depend_on_batching_or_packing(batching):
    model = tiny_model("qwen2").eval()
    expected = evaluate_rows(model, _records(), packing=False, micro_batch_size=1)
    result = evaluate_rows(model, _records(), **batching)
    assert result["eval_tokens"] == expected["eval_tokens"]
    assert result["eval_token_accuracy"] == expected["eval_token_accuracy"]
    assert result["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)


def test_rows_come_as_a_dataset_columns_or_records_and_the_model_keeps_its_mode():
    model = tiny_model("llama").train()
    dataset = synthetic_dataset(10, seed=3, min_len=3, max_len=20)
    columns = {"input_ids": dataset["input_ids"], "labels": dataset["labels"]}
    results = [evaluate_rows(model, rows) for rows in (dataset, columns, _records())]
    assert results[0] == results[1] == results[2]
    assert model.training  # evaluated in eval mode (no dropout), handed back as it was


# Evaluates rows holding one chunk of trained positions twice (the first warms up one-off
# allocations), and prints what the second evaluation added to the resident set at its peak, and
# the size of one chunk of fp32 logits. Writing 5 to clear_refs resets the peak (VmHWM) to the
# current size, so the growth is measured in this fresh process alone.
_EVAL_PEAK = """
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from exemplar.evaluate.likelihood import evaluate_rows

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

torch.set_num_threads(1)
torch.manual_seed(0)
vocab, rows, width = 16384, 4, 512
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
ids = torch.randint(0, vocab, (rows, width)).tolist()
records = [{"input_ids": row, "labels": row} for row in ids]  # every next token trained
evaluate_rows(model, records, micro_batch_size=rows, packing=False)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
evaluate_rows(model, records, micro_batch_size=rows, packing=False)
growth = status("VmHWM") - before
print(json.dumps({"growth": growth, "chunk": rows * (width - 1) * vocab * 4}))
"""


def test_an_evaluation_batch_holds_one_chunk_of_logits_at_a_time():
    """Without a graph nothing keeps the logits, so their log-softmax is computed in them: an
    evaluation batch needs what a training step's loss does (one [chunk, vocab] fp32 tensor), not
    that twice, which on a 150k vocabulary is 2.4 GiB more at the first evaluation of a run."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _EVAL_PEAK],
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    growth, chunk = measured["growth"], measured["chunk"]
    print(f"evaluation peak growth {growth / 2**20:.0f} MiB, one chunk of logits {chunk / 2**20:.0f} MiB")
    assert growth < 1.5 * chunk, f"{growth / 2**20:.0f} MiB for a {chunk / 2**20:.0f} MiB chunk of logits"
