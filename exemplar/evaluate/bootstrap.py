"""Bootstrap confidence intervals over examples, and paired differences between models.

Percentile intervals: resample the examples with replacement (a seeded numpy Generator, so a
rerun gives the same interval), recompute the statistic, take the 2.5th and 97.5th percentiles.
A statistic is a ratio of sums, sum(values) / sum(weights): a plain mean has weight 1 per example,
NLL per token has each example's loss sum over its token count (so long answers weigh by their
tokens, exactly as the point estimate does). Paired differences resample the same example indices
for both models, which removes the between-example variance the two models share.

Written here rather than with scipy.stats.bootstrap: scipy is not a dependency, and the ratio
statistic with shared indices for paired differences is a few lines of numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _ratio(values: np.ndarray, weights: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray | float:
    if idx is None:
        return float(values.sum() / weights.sum())
    totals = weights[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return values[idx].sum(axis=1) / totals


def _as_arrays(values: Sequence[float], weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.shape != w.shape or v.ndim != 1:
        raise ValueError(f"values and weights must be 1-D of one length, got {v.shape} and {w.shape}")
    if len(v) == 0 or w.sum() <= 0:
        raise ValueError("a bootstrap needs at least one example with a positive weight")
    return v, w


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]  # a resample of only zero-weight examples has no ratio
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """sum(values)/sum(weights) (the mean when weights are None) and its percentile interval."""
    v, w = _as_arrays(values, weights)
    stats = _ratio(v, w, _indices(len(v), resamples, seed))
    return Interval(_ratio(v, w), *_percentiles(stats, confidence))


def paired_difference(
    values_a: Sequence[float],
    values_b: Sequence[float],
    weights_a: Sequence[float] | None = None,
    weights_b: Sequence[float] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """statistic(a) - statistic(b) over the same examples, with the interval of resampling the
    same indices for both."""
    va, wa = _as_arrays(values_a, weights_a)
    vb, wb = _as_arrays(values_b, weights_b)
    if len(va) != len(vb):
        raise ValueError(f"a paired difference needs the same examples: {len(va)} vs {len(vb)}")
    idx = _indices(len(va), resamples, seed)
    stats = _ratio(va, wa, idx) - _ratio(vb, wb, idx)
    return Interval(_ratio(va, wa) - _ratio(vb, wb), *_percentiles(stats, confidence))
