"""`exemplar curate best-of-k`: K sampled responses per prompt, scored, the best kept.

Best-of-K and rejection sampling: each prompt is answered K times (sample j of the prompt at
0-based input position i has seed `seed + i*K + j`, so every response has its own seed and a
rerun sends the same requests), each response is scored by a scorer of `exemplar curate score`
(curate/scorers: a verifier, a reward model, a judge, ...) on the candidate record (the prompt plus
that response), and then, by `keep`:

- "best": the highest-scoring response (the first on ties);
- "all-passing": every passing response, one kept row each;
- "distinct-passing": every passing response that is not a near-duplicate (MinHash Jaccard
  similarity >= `distinct_threshold`, curate/dedup.py's signatures) of one kept before it for
  the same prompt: the RFT recipe (Yuan et al. 2023, distinct reasoning paths).

A response passes when its score is at least `min_score` (1.0 when not given: a verifier's
True). With `min_score`, a prompt with no passing response is removed with reason
"below_min_score" (its best response shown); without it, "best" keeps the best whatever its
score. A prompt none of whose responses could be scored is removed as "score_error"; empty
responses are never kept (an empty assistant turn cannot be trained on): a prompt with only
empty responses is removed as "empty_response".

The prompt is the conversation without its trailing assistant turns; the last of those (the
reference answer, when the input has one) is put at `meta.reference` for a verifier to check
against. Kept rows carry `meta.scores.NAME` and `meta.best_of_k` = {"model", "sampling", "k",
"sample", "seed", "scores" (all K, in sample order), "finish_reason"}.

summary.json adds "pass_rate" ({"at_1", "at_k", "k", "threshold", "prompts"}: pass@1 is the
mean share of passing responses per prompt, the unbiased estimate from K samples; pass@K the
share of prompts with at least one) and "scores" (the distribution over every response).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from exemplar.curate.generation_stage import (
    GenerationWriter,
    Sampling,
    conversation_messages,
    prompt_chunks,
    request_messages,
    source_text,
)
from exemplar.curate.io import Record
from exemplar.errors import ConfigError, DataError
from exemplar.evaluate.generator import GenerationRequest, GenerationResult, Generator

Keep = Literal["best", "all-passing", "distinct-passing"]
DEFAULT_PASS = 1.0


@dataclass(frozen=True)
class BestOfK:
    """What one best-of-K stage does with its K responses per prompt."""

    k: int
    keep: Keep = "best"
    min_score: float | None = None
    distinct_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.keep not in ("best", "all-passing", "distinct-passing"):
            raise ConfigError(f"--keep must be best, all-passing or distinct-passing, got {self.keep!r}")
        if not 0 < self.distinct_threshold <= 1:
            raise ConfigError(f"--distinct-threshold must be in (0, 1], got {self.distinct_threshold}")

    @property
    def threshold(self) -> float:
        return DEFAULT_PASS if self.min_score is None else self.min_score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def scorer(spec: str, config: Any = None):
        from exemplar.curate.scorers import make_scorer

        return make_scorer(spec, config)


@dataclass
class _Prompt:
    index: int
    record: Record
    messages: list[dict[str, Any]]
    reference: str | None
    result: GenerationResult | None = None


def split_prompt(record: Record) -> tuple[list[dict[str, Any]], str | None]:
    """(the messages to answer, the reference answer): trailing assistant turns are cut."""
    messages = conversation_messages(record)
    reference = None
    while messages and messages[-1].get("role") == "assistant":
        reference = messages.pop().get("content") if reference is None else reference
    if not any(m.get("role") in ("user", "tool") for m in messages):
        raise DataError(f"{source_text(record)}: no user message to answer")
    return messages, reference


def best_of_k(
    records: Iterable[Record],
    writer: GenerationWriter,
    generator: Generator,
    scorer: Any,
    plan: BestOfK,
    *,
    sampling: Sampling,
    model: str,
    progress: bool = True,
) -> None:
    tally = _Tally(plan)
    info = {"model": model, "sampling": sampling.to_dict(), "k": plan.k}
    # Each prompt is K requests: hand the backend about its preferred number of requests at once.
    prompts_per_call = max(1, generator.preferred_batch // plan.k)
    with tqdm(desc=f"best-of-{plan.k}", unit=" prompts", disable=not progress) as bar:
        for chunk in prompt_chunks(records, prompts_per_call):
            prompts = [_Prompt(i, r, *split_prompt(r)) for i, r in chunk]
            requests = [
                GenerationRequest(
                    request_messages(p.messages),
                    tools=p.record.get("tools"),
                    seed=sampling.seed + p.index * plan.k,
                    n=plan.k,
                    **sampling.request_args(),
                )
                for p in prompts
            ]
            for prompt, result in zip(prompts, generator.generate(requests), strict=True):
                prompt.result = result
            _decide(prompts, writer, scorer, plan, info, tally)
            bar.update(len(chunk))
    writer.extra.update(tally.summary())
    writer.note_generator(generator)


def _decide(
    prompts: list[_Prompt], writer: GenerationWriter, scorer: Any, plan: BestOfK, info: dict, tally: _Tally
) -> None:
    answered = [p for p in prompts if p.result is not None and p.result.ok]
    candidates = [_candidate(p, j, info, scorer.name) for p in answered for j in range(plan.k)]
    scores = scorer.score(candidates) if candidates else []
    if len(scores) != len(candidates):
        raise ConfigError(
            f"scorer {scorer.name!r} returned {len(scores)} scores for {len(candidates)} records"
        )
    by_prompt = {
        id(p): (candidates[n * plan.k : (n + 1) * plan.k], scores[n * plan.k : (n + 1) * plan.k])
        for n, p in enumerate(answered)
    }
    for prompt in prompts:
        if id(prompt) not in by_prompt:
            writer.fail(prompt.record, prompt.result.error if prompt.result else "not generated")
            continue
        rows, found = by_prompt[id(prompt)]
        values = [s.value if s.error is None else None for s in found]
        for row, value in zip(rows, values, strict=True):
            row["meta"]["scores"][scorer.name] = value
            row["meta"]["best_of_k"]["scores"] = values
        tally.add(values)
        _keep_or_remove(rows, values, found, writer, plan, tally)


def _candidate(prompt: _Prompt, j: int, info: dict, score_name: str) -> Record:
    sample = prompt.result.samples[j]
    meta = dict(prompt.record.get("meta") or {})
    if prompt.reference is not None:
        meta.setdefault("reference", prompt.reference)
    meta["scores"] = dict(meta.get("scores") or {})
    meta["best_of_k"] = {
        **info,
        "sample": j,
        "seed": info["sampling"]["seed"] + prompt.index * info["k"] + j,
        "finish_reason": sample.finish_reason,
    }
    messages = [*prompt.messages, {"role": "assistant", "content": sample.text}]
    return {**prompt.record, "messages": messages, "meta": meta}


def _keep_or_remove(rows, values, found, writer: GenerationWriter, plan: BestOfK, tally: _Tally) -> None:
    scored = [j for j, v in enumerate(values) if v is not None]
    if not scored:
        writer.remove(rows[0], "score_error", found[0].error or "no score")
        return
    # An empty response cannot be trained on (`exemplar data validate` refuses it), whatever its score.
    scored = [j for j in scored if (rows[j]["messages"][-1]["content"] or "").strip()]
    if not scored:
        writer.remove(rows[0], "empty_response", f"all {plan.k} responses are empty")
        return
    best = max(scored, key=lambda j: (values[j], -j))
    passing = [j for j in scored if values[j] >= plan.threshold]
    if plan.keep == "best" and plan.min_score is None:
        writer.keep(rows[best])
        return
    if not passing:
        writer.remove(
            rows[best],
            "below_min_score",
            f"the best of {plan.k} responses scored {values[best]:g}, below {plan.threshold:g}",
        )
        return
    chosen = [best] if plan.keep == "best" else passing
    if plan.keep == "distinct-passing":
        chosen = distinct(rows, passing, plan.distinct_threshold)
        tally.duplicates += len(passing) - len(chosen)
    writer.keep(rows[chosen[0]])
    for j in chosen[1:]:
        writer.keep_more(rows[j])


def distinct(rows: list[Record], order: list[int], threshold: float) -> list[int]:
    """The responses among `order` that are not near-duplicates of an earlier one kept."""
    from exemplar.curate.dedup import signatures
    from exemplar.curate.text import normalise

    texts = [rows[j]["messages"][-1]["content"] for j in order]
    hashes = signatures(texts)
    kept: list[int] = []
    for n in range(len(order)):
        same = any(
            normalise(texts[n]) == normalise(texts[m]) or float(np.mean(hashes[n] == hashes[m])) >= threshold
            for m in kept
        )
        if not same:
            kept.append(n)
    return [order[n] for n in kept]


class _Tally:
    """Pass counts per prompt and every score, for summary.json."""

    def __init__(self, plan: BestOfK):
        self.plan = plan
        self.passing: list[int] = []
        self.values: list[float] = []
        self.errors = 0
        self.duplicates = 0

    def add(self, values: list[float | None]) -> None:
        self.passing.append(sum(v is not None and v >= self.plan.threshold for v in values))
        self.values.extend(v for v in values if v is not None)
        self.errors += sum(v is None for v in values)

    def summary(self) -> dict[str, Any]:
        k, n = self.plan.k, len(self.passing)
        rates = {
            "at_1": round(sum(c / k for c in self.passing) / n, 4) if n else 0.0,
            "at_k": round(sum(c > 0 for c in self.passing) / n, 4) if n else 0.0,
            "k": k,
            "threshold": self.plan.threshold,
            "prompts": n,
        }
        out: dict[str, Any] = {"pass_rate": rates, "scores": score_distribution(self.values, self.errors)}
        if self.plan.keep == "distinct-passing":
            out["near_duplicates_dropped"] = self.duplicates
        return out


def score_distribution(values: list[float], errors: int) -> dict[str, Any]:
    """Count, mean, quantiles; and each value's count when there are few distinct ones (a verifier)."""
    out: dict[str, Any] = {"count": len(values), "errors": errors}
    if not values:
        return out
    array = np.asarray(values, dtype=float)
    q = np.quantile(array, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    out.update(mean=round(float(array.mean()), 4))
    out.update(
        {
            name: round(float(v), 4)
            for name, v in zip(("min", "p10", "p25", "p50", "p75", "p90", "max"), q, strict=True)
        }
    )
    counts = Counter(values)
    if len(counts) <= 10:
        out["values"] = {f"{v:g}": c for v, c in sorted(counts.items())}
    return out
