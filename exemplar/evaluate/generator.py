"""The one generation interface: requests in, results out, whichever backend answers them.

`LocalGenerator` (a model folder, `model.generate`) and `HttpGenerator` (any OpenAI-compatible
`/v1/chat/completions` server) implement it; `exemplar generate`, `exemplar chat`, the quickstart,
curation and evaluation all talk to a `Generator`, never to a backend directly.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from exemplar.errors import ExemplarError


@dataclass(frozen=True)
class GenerationRequest:
    """One conversation to answer `n` times.

    Sample j of a request is drawn with seed `seed + j`, so each sample is reproducible on its own
    and a request's samples differ from each other. temperature 0 is greedy decoding (the seed
    then does not matter).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample_seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.n)]


@dataclass(frozen=True)
class Sample:
    """One answer. `stopped` is true when it ended at the end-of-turn token (finish_reason "stop"),
    false when it hit `max_new_tokens` ("length")."""

    text: str
    stopped: bool
    finish_reason: str
    tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(data["text"], bool(data["stopped"]), data["finish_reason"], data.get("tokens"))


@dataclass(frozen=True)
class GenerationResult:
    """The answers to one request: `samples` (n of them) or, when it still failed, `error`."""

    samples: tuple[Sample, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        return self._first().text

    @property
    def stopped(self) -> bool:
        return self._first().stopped

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    def _first(self) -> Sample:
        if self.error is not None:
            raise ValueError(f"this request failed: {self.error}")
        return self.samples[0]


@dataclass
class GeneratorStats:
    """Counters a caller can print or log. `requests` counts what was sent to the backend (HTTP
    requests, retries included; samples generated, locally), `retries` the repeated attempts,
    `failures` the samples that failed for good, `cache_hits` the samples answered from the
    on-disk cache without asking."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("requests", "retries", "failures", "cache_hits")}


class Generator(ABC):
    """Answers `GenerationRequest`s. Results come back in input order, one per request; a
    request that fails for good comes back with its `error` set instead of raising, so one bad row
    never loses the others."""

    #: how many requests a caller should hand over at once to keep the backend busy
    preferred_batch: int = 8

    def __init__(self) -> None:
        self.stats = GeneratorStats()

    @property
    def remembers_answers(self) -> bool:
        """True when an answer given once is not generated again (an on-disk cache), so answering
        rows that cannot be written yet is not wasted work."""
        return False

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield the text of one answer (sample 0) as it is produced. Backends that can stream
        override this; the fallback yields the whole answer once it is complete."""
        [result] = self.generate([request])
        if not result.ok:
            raise GenerationError(result.error or "generation failed")
        yield result.text

    def close(self) -> None:
        """Release connections or memory; the generator is not used afterwards."""
        return None  # the local backend holds nothing a garbage collector would not free

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GenerationError(ExemplarError):
    """A request that could not be answered (after retries, for the HTTP backend)."""
