"""Which examples go into which optimizer step: a pure function of (lengths, config, epoch).

Nothing here holds iterator state. Resuming at global step k recomputes the plan and starts at k,
so a resumed run sees exactly the batches an uninterrupted run would have.

Vocabulary:
  sequence   one row of a batch: a packed bin of example indices, or a single example;
  step       the GLOBAL list of sequences of one optimizer step: micro_batch_size x grad_accum x
             world_size sequences (or grad_accum x world_size token-budget groups). It depends on
             the world size only through that product, so 2 ranks x micro-batch 4 and 1 process x
             micro-batch 8 plan exactly the same steps;
  micro-batch  what one rank runs forward/backward at once. `rank_micro_batches` cuts a rank's
             contiguous share of a step into micro-batches, so the same examples form step k
             whatever the number of ranks, and the loss (normalized by the step's trained tokens)
             is the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from exemplar.data.lengths import example_lengths
from exemplar.data.packing import best_fit_decreasing, fill_ratio
from exemplar.errors import ExemplarError

Seq = tuple[int, ...]  # example indices of one row
Step = list[Seq]


def checked_lengths(dataset, max_length: int, what: str = "training") -> np.ndarray:
    """Token counts of the rows, checked: at least one row, every row 1 to `max_length` tokens."""
    lengths = example_lengths(dataset)
    if len(lengths) == 0:
        raise ExemplarError(f"no {what} examples: the {what} dataset is empty")
    if lengths.min() < 1 or lengths.max() > max_length:
        bad = int(np.flatnonzero((lengths < 1) | (lengths > max_length))[0])
        raise ExemplarError(
            f"{what} row {bad} has {int(lengths[bad])} tokens; rows must have 1 to max_length={max_length}"
        )
    return lengths


def make_sequences(lengths: np.ndarray, max_length: int, packing: bool) -> list[Seq]:
    """Rows of the dataset: best-fit-decreasing bins, or one example per row."""
    if packing:
        return [tuple(b) for b in best_fit_decreasing(lengths, max_length)]
    return [(i,) for i in range(len(lengths))]


def token_budget_groups(seq_lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy consecutive groups whose padded size (rows x longest row) stays within `budget`.

    A row longer than the budget on its own forms a group by itself.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(seq_lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


@dataclass
class TrainPlan:
    """The deterministic schedule of sequences, steps and epochs for one dataset and config."""

    lengths: np.ndarray  # tokens per example
    sequences: list[Seq]
    micro_batch_size: int
    grad_accum: int
    max_tokens_per_batch: int | None = None
    seed: int = 0
    shuffle: bool = True
    world_size: int = 1  # ranks sharing each step: `micro_batch_size` is per rank

    def __post_init__(self) -> None:
        self.seq_lengths = _row_lengths(self.lengths, self.sequences)
        # Constant across epochs: the rows are fixed and only their order is shuffled.
        self.steps_per_epoch = len(self.epoch_steps(0))

    @classmethod
    def build(
        cls,
        lengths: np.ndarray,
        *,
        max_length: int,
        packing: bool,
        micro_batch_size: int,
        grad_accum: int,
        max_tokens_per_batch: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        world_size: int = 1,
    ) -> TrainPlan:
        lengths = np.asarray(lengths, dtype=np.int64)
        sequences = make_sequences(lengths, max_length, packing)
        return cls(
            lengths, sequences, micro_batch_size, grad_accum, max_tokens_per_batch, seed, shuffle, world_size
        )

    # -- epochs and steps ----------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row order of an epoch: a permutation seeded by (seed, epoch), stable across runs."""
        if not self.shuffle:
            return np.arange(len(self.sequences))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))

    def epoch_steps(self, epoch: int) -> list[Step]:
        order = self.epoch_order(epoch)
        if self.max_tokens_per_batch is None:
            size = self.micro_batch_size * self.grad_accum * self.world_size
            groups = [order[i : i + size].tolist() for i in range(0, len(order), size)]
        else:
            micro = token_budget_groups(self.seq_lengths[order].tolist(), self.max_tokens_per_batch)
            per_step = self.grad_accum * self.world_size
            groups = [
                [int(order[j]) for mb in micro[i : i + per_step] for j in mb]
                for i in range(0, len(micro), per_step)
            ]
        return [[self.sequences[i] for i in g] for g in groups]

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        """`max_steps` when set (crossing epochs as needed), else `epochs` worth of steps (rounded up)."""
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch - 1e-9))

    def locate(self, global_step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a 0-based global step."""
        return divmod(global_step, self.steps_per_epoch)

    def iter_steps(self, start: int, total: int) -> Iterator[tuple[int, int, Step]]:
        """(0-based global step, epoch, step) from `start` up to `total`, crossing epochs as needed."""
        step = start
        while step < total:
            epoch, index = self.locate(step)
            for s in self.epoch_steps(epoch)[index : index + (total - step)]:
                yield step, epoch, s
                step += 1

    # -- per rank ------------------------------------------------------------------------------

    def rank_micro_batches(self, step: Step, rank: int = 0, world_size: int = 1) -> list[list[Seq]]:
        """This rank's contiguous share of a step, cut into micro-batches.

        Rank r of n takes rows [r * len / n, (r + 1) * len / n): the shares tile the step with no
        gap or overlap, and differ in size by at most one row. A share may be empty (a last step
        with fewer rows than ranks); `micro_batches_per_rank` says how many micro-batches the
        busiest rank runs, which every rank must match (with zero-weight fillers) for the
        collectives of FSDP/DDP to line up.

        Within the share, rows are sorted longest first before cutting: the step's gradient does
        not depend on the cut (the loss is normalized per step), and similar lengths waste less
        padding. Longest first also makes an out-of-memory error show up on the first micro-batch.
        """
        n = len(step)
        share = step[rank * n // world_size : (rank + 1) * n // world_size]
        share = sorted(share, key=lambda s: -self.row_length(s))  # stable: ties keep plan order
        if self.max_tokens_per_batch is None:
            m = self.micro_batch_size
            return [share[i : i + m] for i in range(0, len(share), m)]
        groups = token_budget_groups([self.row_length(s) for s in share], self.max_tokens_per_batch)
        return [[share[i] for i in g] for g in groups]

    def micro_batches_per_rank(self, step: Step, world_size: int) -> int:
        """The most micro-batches any rank runs for `step` (every rank can compute it locally)."""
        return max(len(self.rank_micro_batches(step, r, world_size)) for r in range(world_size))

    def row_length(self, seq: Seq) -> int:
        return int(sum(int(self.lengths[i]) for i in seq))

    def fill_ratio(self, max_length: int) -> float:
        return fill_ratio(self.sequences, self.lengths, max_length)


def _row_lengths(lengths: np.ndarray, sequences: list[Seq]) -> np.ndarray:
    """Tokens per row, vectorized (a Python loop over a million bins takes seconds)."""
    if not sequences:
        return np.zeros(0, dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64)
    sizes = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.add.reduceat(lengths[flat], starts).astype(np.int64)
