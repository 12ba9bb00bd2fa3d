"""Packing examples into fixed-capacity rows: which examples share a row of at most `max_length` tokens.

Packing puts several short examples into one row so that little compute is spent on padding.
This module only decides the rows (bin packing by token count); `exemplar.train.batch` turns them
into tensors that keep a packed row equivalent to running its examples one at a time.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Sequence

import numpy as np


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items (by index) into bins of `capacity`: largest first, each into the fullest bin it fits.

    Deterministic: ties in length keep index order, and among bins with the same free space the
    one that has had it longest is used. O(n log n): bins are bucketed by their free space, and the distinct free-space
    values are kept in a sorted list searched with bisect (at most `capacity + 1` values).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() <= 0 or lengths.max() > capacity):
        bad = int(np.flatnonzero((lengths <= 0) | (lengths > capacity))[0])
        raise ValueError(f"item {bad} has length {int(lengths[bad])}, outside 1..{capacity}")
    order = np.argsort(-lengths, kind="stable")

    bins: list[list[int]] = []
    by_space: dict[int, deque[int]] = {}  # free space -> bins with exactly that much free space
    spaces: list[int] = []  # sorted distinct free-space values that have at least one bin
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        pos = bisect.bisect_left(spaces, length)
        if pos < len(spaces):  # the tightest bin that still fits
            space = spaces[pos]
            queue = by_space[space]
            b = queue.popleft()
            if not queue:
                del by_space[space]
                spaces.pop(pos)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(index)
        left = space - length
        if left > 0:
            if left not in by_space:
                by_space[left] = deque()
                bisect.insort(spaces, left)
            by_space[left].append(b)
    return bins


def first_fit(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Plain first-fit in the given order (O(n * bins)): the baseline best-fit-decreasing must beat."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for index, length in enumerate(int(x) for x in lengths):
        for b, load in enumerate(loads):
            if load + length <= capacity:
                bins[b].append(index)
                loads[b] += length
                break
        else:
            bins.append([index])
            loads.append(length)
    return bins


def fill_ratio(bins: Sequence[Sequence[int]], lengths: Sequence[int] | np.ndarray, capacity: int) -> float:
    """Fraction of the packed rows' `capacity` slots that hold real tokens (1.0 = no padding)."""
    if not bins:
        return 0.0
    items = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64)
    used = int(np.asarray(lengths, dtype=np.int64)[items].sum())
    return used / (len(bins) * capacity)
