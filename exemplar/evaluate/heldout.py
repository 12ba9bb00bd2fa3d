"""Held-out likelihood: summed response NLL, token hits and trained-token counts per example.

`response_nll` is the one place this module touches the training loss (`LMLoss`), so the
training-side evaluation can replace it when it moves. Token rows come from the training data
pipeline (`prepare_data`), so the tokens scored are exactly the tokens training would train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from exemplar.data.schema import IGNORE_INDEX
from exemplar.train.batch import collate_padded
from exemplar.train.loss import LMLoss


@dataclass(frozen=True)
class TokenScores:
    """One example: summed cross-entropy over its trained tokens, argmax hits, and their count."""

    loss_sum: float
    correct: int
    tokens: int


@torch.no_grad()
def response_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    token_rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    micro_batch_size: int = 8,
) -> list[TokenScores]:
    """Per-example sums over the trained tokens (labels != -100) of `(input_ids, labels)` rows."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_fn = LMLoss(model)
    loss_fn.check_head()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[TokenScores] = []
    try:
        for start in range(0, len(token_rows), micro_batch_size):
            rows = [(list(ids), list(labels)) for ids, labels in token_rows[start : start + micro_batch_size]]
            batch = collate_padded(rows, pad_id).to(device)
            sums = loss_fn(batch, with_accuracy=True, reduction="none")
            # reduction "none" gives one loss per trained position, in row-major order.
            per_row = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            losses = sums.loss_sum.double().split(per_row)
            hits = sums.num_correct.split(per_row)
            for loss, hit, n in zip(losses, hits, per_row, strict=True):
                scores.append(TokenScores(float(loss.sum()), int(hit.sum()), int(n)))
    finally:
        model.train(was_training)
    return scores
