"""What every scorer is: a name and `score(records) -> [Score]`, one per record, in order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

Record = dict[str, Any]


@dataclass
class Score:
    value: float | None  # None only with an error
    error: str | None = None  # why there is no score (an unparsable judge answer, a verifier exception...)
    detail: dict[str, Any] | None = None  # e.g. {"rationale": "..."} for the judge


class Scorer(Protocol):
    name: str  # the key written at meta.scores.NAME

    def score(self, records: list[Record]) -> list[Score]: ...


def number_score(value: Any, what: str) -> Score:
    """A Score from a returned number or bool (True -> 1.0); anything else is an error, never a guess."""
    if isinstance(value, bool):
        return Score(1.0 if value else 0.0)
    if isinstance(value, int | float) and math.isfinite(value):
        return Score(float(value))
    if isinstance(value, int | float):
        return Score(None, f"{what} returned {value!r}, not a finite number")
    return Score(None, f"{what} returned {type(value).__name__} {value!r:.80}, not a number or a bool")
