"""Micro-batch tensors: a `Batch`, and the collate functions that build one from packed rows.

A packed row (see `exemplar.data.packing`) holds several examples. Three things keep it
equivalent to running its examples one at a time:

* `position_ids` restart at 0 for every example (rotary/learned positions see each example alone);
* the label at the first position of every example is IGNORE_INDEX, so the last token of one
  example is never trained to predict the first token of the next;
* attention never crosses examples. When `attention_mask` is None, transformers 5.x derives a
  block-diagonal causal mask from position ids that restart at 0 (`masking_utils.
  find_packed_sequence_indices`) for the sdpa, eager and flex backends, sliding windows included.
  Its flash-attention path does so only for a single row (`_is_packed_sequence` wants batch size
  1), so for flash backends `flatten_batch` turns a batch into one padding-free row
  [1, total_tokens] whose restarting position ids become varlen `cu_seqlens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exemplar.data.schema import IGNORE_INDEX


@dataclass
class Batch:
    """One micro-batch, ready for the model.

    `labels` are aligned with `input_ids` (HF convention): the loss at position t predicts
    labels[t + 1]. `attention_mask` is set only for padded (unpacked) batches; packed batches
    carry the document structure in `position_ids` instead.
    """

    input_ids: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, IGNORE_INDEX where untrained, at pads and at each example's start
    position_ids: torch.Tensor  # [B, L] long, restarting at 0 for every example
    attention_mask: torch.Tensor | None  # [B, L] long for padded batches, None for packed ones
    num_tokens: int  # real (non-pad) input tokens
    num_trained: int  # positions whose next label is trained (what the loss is averaged over)
    row_lengths: list[int]  # real tokens at the start of each row; the rest is padding
    # Packed batches: the length of every document of every row, in order, the padding tail
    # counted as one more document; they sum to the row width. None for padded batches.
    doc_lengths: list[list[int]] | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            move(self.attention_mask),
            self.num_tokens,
            self.num_trained,
            self.row_lengths,
            self.doc_lengths,
        )

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def collate_packed(rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], pad_id: int) -> Batch:
    """Rows of examples -> a packed batch, each row right-padded to the longest row.

    `rows[b]` is the list of (input_ids, labels) packed into row b. The padding tail gets its own
    position ids (0, 1, ...) so transformers sees it as one more document: real tokens never
    attend to it (it comes last and attention is causal), and its labels are IGNORE_INDEX.
    """
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    row_lengths, doc_lengths = [], []
    for b, row in enumerate(rows):
        start = 0
        docs = []
        for ids, labs in row:
            n = len(ids)
            input_ids[b, start : start + n] = torch.as_tensor(ids, dtype=torch.long)
            labels[b, start : start + n] = torch.as_tensor(labs, dtype=torch.long)
            labels[b, start] = IGNORE_INDEX  # never predicted from the previous example
            position_ids[b, start : start + n] = torch.arange(n)
            start += n
            docs.append(n)
        row_lengths.append(start)
        position_ids[b, start:] = torch.arange(width - start)
        if width > start:
            docs.append(width - start)
        doc_lengths.append(docs)
    num_trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return Batch(
        input_ids, labels, position_ids, None, sum(row_lengths), num_trained, row_lengths, doc_lengths
    )


def collate_padded(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest, with a 2D attention mask (packing off)."""
    batch = collate_packed([[ex] for ex in examples], pad_id)
    batch.doc_lengths = None  # the attention mask carries the structure
    width = batch.input_ids.shape[1]
    lengths = torch.tensor(batch.row_lengths)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    # Positions keep counting through the pads, as a 2D-mask forward without position ids would.
    position_ids = torch.arange(width).expand(len(examples), width).clone()
    batch.attention_mask, batch.position_ids = attention_mask, position_ids
    return batch


def flatten_batch(batch: Batch) -> Batch:
    """Concatenate the real tokens of all rows into one padding-free row [1, num_tokens].

    For flash-attention backends: transformers turns the restarting position ids of a single row
    into varlen `cu_seqlens`, so documents stay isolated and no compute is spent on padding.
    """
    keep = torch.arange(batch.input_ids.shape[1])[None, :] < torch.tensor(batch.row_lengths)[:, None]
    keep = keep.to(batch.input_ids.device)
    return Batch(
        batch.input_ids[keep][None],
        batch.labels[keep][None],
        batch.position_ids[keep][None],
        None,
        batch.num_tokens,
        batch.num_trained,
        [batch.num_tokens],
        None if batch.doc_lengths is None else [_real_docs(batch.doc_lengths, batch.row_lengths)],
    )


def _real_docs(doc_lengths: list[list[int]], row_lengths: list[int]) -> list[int]:
    """Every row's documents without its padding tail, in order."""
    out = []
    for docs, real in zip(doc_lengths, row_lengths, strict=True):
        total = 0
        for n in docs:
            if total >= real:
                break
            out.append(n)
            total += n
    return out


class BatchLoader:
    """Turns planned rows (tuples of example indices) into tensors on the training device."""

    def __init__(self, dataset, packing: bool, pad_id: int, device: torch.device, flat: bool):
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.packing, self.pad_id, self.device, self.flat = packing, pad_id, device, flat
        self._filler: Batch | None = None

    def filler(self) -> Batch:
        """A 2-token batch with one trained position, run with weight 0 by a rank with no rows left.

        A real (not all-masked) target makes the pass touch every parameter the real ones do
        (the output layer included), so the gradient collectives of FSDP/DDP line up.
        """
        if self._filler is None:
            example = ([self.pad_id, self.pad_id], [IGNORE_INDEX, self.pad_id])
            batch = (
                collate_packed([[example]], self.pad_id)
                if self.packing
                else collate_padded([example], self.pad_id)
            )
            self._filler = (flatten_batch(batch) if self.flat else batch).to(self.device)
        return self._filler

    def __call__(self, rows: list[tuple[int, ...]]) -> Batch:
        wanted = sorted({i for row in rows for i in row})
        data = self.dataset[wanted]
        examples = {
            i: (ids, labs) for i, ids, labs in zip(wanted, data["input_ids"], data["labels"], strict=True)
        }
        if self.packing:
            batch = collate_packed([[examples[i] for i in row] for row in rows], self.pad_id)
        else:
            batch = collate_padded([examples[row[0]] for row in rows], self.pad_id)
        if self.flat:
            batch = flatten_batch(batch)
        return batch.to(self.device)
