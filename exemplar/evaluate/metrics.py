"""Simple generation metrics: exact match on normalised text, and how often answers stopped."""

from __future__ import annotations

from collections.abc import Sequence


def normalize(text: str) -> str:
    """Lowercase (casefold), trim, and collapse every run of whitespace to one space.

    Nothing else is removed: punctuation and digits are kept, so "85" and "85." differ, because
    for short exact answers a trailing period is part of what the model was trained to write.
    """
    return " ".join(text.casefold().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize`; 0.0 for no pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def stop_rate(stopped: Sequence[bool]) -> float:
    """Fraction of answers that ended with a stop token rather than at the length limit."""
    return sum(bool(s) for s in stopped) / len(stopped) if stopped else 0.0
