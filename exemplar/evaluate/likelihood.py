"""Held-out likelihood: mean token loss (NLL), perplexity and token accuracy over tokenized rows.

Rows are what training reads (input_ids, and labels with IGNORE_INDEX where nothing is trained),
scored with the training masks, packing and batching: the numbers are over exactly the tokens
training would train on. `evaluate_rows` scores a model on its own; the training loop calls
`eval_batches` and `evaluate` with its wrapped model and its world of ranks.

    from exemplar.evaluate.likelihood import evaluate_rows
    result = evaluate_rows(model, {"input_ids": [...], "labels": [...]}, micro_batch_size=8)
    result["eval_loss"], result["eval_perplexity"], result["eval_token_accuracy"], result["eval_tokens"]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch
from torch import nn

from exemplar.train import distributed as dist_utils
from exemplar.train.attention import needs_flat_batches
from exemplar.train.batch import Batch, BatchLoader
from exemplar.train.batching import TrainPlan, checked_lengths
from exemplar.train.loss import LMLoss
from exemplar.train.precision import autocast_factory

Rows = datasets.Dataset | Mapping[str, Sequence[Sequence[int]]] | Sequence[Mapping[str, Sequence[int]]]


def evaluate_rows(
    model: nn.Module,
    rows: Rows,
    *,
    micro_batch_size: int = 8,
    packing: bool = True,
    max_length: int | None = None,
    max_tokens_per_batch: int | None = None,
    pad_id: int = 0,
    precision: str = "auto",
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Loss, perplexity and token accuracy of `model` on `rows`, on the device the model is on.

    `rows` is a `datasets.Dataset` with input_ids and labels columns, a mapping of those two
    columns, or a list of {"input_ids", "labels"} records. Packed rows hold at most `max_length`
    tokens (default: the longest row). The result does not depend on the batching: every trained
    token counts once. The pad id is never attended to nor scored, so any id in the vocabulary works.
    """
    dataset = _as_dataset(rows)
    device = next(model.parameters()).device
    if max_length is None:
        max_length = max((len(ids) for ids in dataset["input_ids"]), default=1)
    batches = eval_batches(
        dataset,
        max_length=max_length,
        packing=packing,
        micro_batch_size=micro_batch_size,
        max_tokens_per_batch=max_tokens_per_batch,
        pad_id=pad_id,
        device=device,
        flat=needs_flat_batches(model),
    )
    loss_fn = LMLoss(model, chunk_size)
    loss_fn.check_head()
    return evaluate(loss_fn, batches(), autocast_factory(precision, device))


def eval_batches(
    dataset: datasets.Dataset,
    *,
    max_length: int,
    packing: bool,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    flat: bool = False,
    max_tokens_per_batch: int | None = None,
    seed: int = 0,
    world: dist_utils.World = dist_utils.SINGLE,
) -> Callable[[], Iterator[tuple[Batch, bool]]]:
    """A re-iterable of (batch, counted) pairs: this rank's share of each planned step, in dataset
    order, plus fillers so that every rank runs as many forward passes as the busiest one."""
    lengths = checked_lengths(dataset, max_length, "eval")
    plan = TrainPlan.build(
        lengths,
        max_length=max_length,
        packing=packing,
        micro_batch_size=micro_batch_size,
        grad_accum=1,
        max_tokens_per_batch=max_tokens_per_batch,
        seed=seed,
        shuffle=False,
        world_size=world.world_size,
    )
    load = BatchLoader(dataset, packing, pad_id, device, flat)

    def batches() -> Iterator[tuple[Batch, bool]]:
        for step in plan.epoch_steps(0):
            mine = plan.rank_micro_batches(step, world.rank, world.world_size)
            for rows in mine:
                yield load(rows), True
            if world.distributed:
                for _ in range(plan.micro_batches_per_rank(step, world.world_size) - len(mine)):
                    yield load.filler(), False

    return batches


@torch.no_grad()
def evaluate(
    loss_fn: LMLoss,
    batches: Iterable[Batch | tuple[Batch, bool]],
    autocast: Callable[[], contextlib.AbstractContextManager],
    world: dist_utils.World = dist_utils.SINGLE,
) -> dict[str, float]:
    """Loss, perplexity and token accuracy over every trained token of `batches`.

    Items may be (batch, counted) pairs: uncounted ones are fillers that keep the ranks' forward
    passes in step. With several ranks the sums are all-reduced, so every rank returns the totals.
    """
    was_training = loss_fn.model.training
    loss_fn.model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for item in batches:
            batch, counted = item if isinstance(item, tuple) else (item, True)
            with autocast():
                sums = loss_fn(batch, with_accuracy=True)
            if not counted:
                continue
            loss_sum += float(sums.loss_sum)
            correct += int(sums.num_correct)
            count += sums.num_trained
    finally:
        loss_fn.model.train(was_training)
    if world.distributed:
        loss_sum, correct, count = dist_utils.all_reduce_sum([loss_sum, correct, count], world)
        correct, count = int(correct), int(count)
    loss = loss_sum / max(count, 1)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss) if loss < 700 else math.inf,
        "eval_token_accuracy": correct / max(count, 1),
        "eval_tokens": count,
    }


def _as_dataset(rows: Any) -> datasets.Dataset:
    if isinstance(rows, datasets.Dataset):
        return rows
    if isinstance(rows, Mapping):
        return datasets.Dataset.from_dict({"input_ids": rows["input_ids"], "labels": rows["labels"]})
    return datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
