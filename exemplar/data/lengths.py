"""Each example's token count, and the trained tokens, of a prepared `datasets.Dataset`, in
memory that does not grow with the tokens.

The pipeline writes a `length` and a `trained_tokens` column beside the tokens (see
encode_stream.py), so these are read alone and the token values are never touched: reading them
would page the whole memory-mapped table into the process (counted as its memory), and through
an indices mapping (`eval_fraction`, a dataset `weight`, a shuffled or selected view) `datasets`
gathers a column by copying every value it holds. Datasets from elsewhere, without those
columns, have their token lists read a bounded batch of rows at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from exemplar.data.schema import IGNORE_INDEX

# Rows per read. Through an indices mapping `datasets` gathers each row of a batch as a one-row
# Arrow slice (about 850 bytes each, measured), so even the small columns are read in batches.
COUNT_BATCH = 8192
# Rows per read when the token lists themselves must be read (about 1 KiB of tokens a row).
TOKEN_BATCH = 4096


def example_lengths(dataset: Any) -> np.ndarray:
    """Token counts of the rows (int64), in the dataset's order."""
    return _counts(dataset, trained=False)[0]


def token_counts(dataset: Any) -> tuple[np.ndarray, int]:
    """Each row's token count, and the number of trained tokens (labels not ignored) in all."""
    return _counts(dataset, trained=True)


def _counts(dataset: Any, trained: bool) -> tuple[np.ndarray, int]:
    names = set(dataset.column_names)
    length_column = "length" if "length" in names else "input_ids"
    trained_column = "trained_tokens" if "trained_tokens" in names else "labels"
    wanted = [length_column] + ([trained_column] if trained else [])
    small = all(c in ("length", "trained_tokens") for c in wanted)
    view = dataset.select_columns(wanted).with_format("arrow")
    parts, total = [], 0
    for table in view.iter(batch_size=COUNT_BATCH if small else TOKEN_BATCH):
        column = table.column(length_column)
        parts.append(
            column.to_numpy() if length_column == "length" else pc.list_value_length(column).to_numpy()
        )
        if trained and trained_column == "trained_tokens":
            total += int(pc.sum(table.column(trained_column)).as_py() or 0)
        elif trained:  # a dataset from elsewhere: count its labels
            labels = pc.list_flatten(table.column(trained_column))
            total += int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
    lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return lengths, total
