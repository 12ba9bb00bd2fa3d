"""Held-out likelihood on its own: the model's own mean token loss, whatever the batching."""

from __future__ import annotations

import math

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
