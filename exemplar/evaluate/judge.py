"""A pairwise LLM judge through the generation backend, with positions swapped to cancel order bias.

Every (question, candidate, opponent) pair is asked twice: once with the candidate as answer A,
once as answer B. Each verdict scores the candidate 1 (it won), 0.5 (tie) or 0 (it lost); an
example's score is the mean of its parsable verdicts, and the win rate is the mean over examples.
A reply that is not exactly "A", "B" or "tie" is counted as an error, never read as a verdict.

The prompt is a `str.format` template with {question}, {answer_a} and {answer_b} (double any
other braces); the default ships as `exemplar/assets/judge_pairwise.txt`, and users pass their own.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from exemplar.errors import ConfigError
from exemplar.evaluate.generator import GenerationRequest, Generator

FIELDS = {"question", "answer_a", "answer_b"}
JUDGE_MAX_NEW_TOKENS = 8


def default_prompt_path() -> Path:
    return Path(str(resources.files("exemplar").joinpath("assets/judge_pairwise.txt")))


def load_judge_prompt(path: str | Path | None = None) -> str:
    path = Path(path) if path else default_prompt_path()
    template, named = read_format_template(path, "the judge prompt")
    if named != FIELDS:
        raise ConfigError(
            f"{path}: the judge prompt must use exactly the fields {sorted(FIELDS)}, found {sorted(named)}"
        )
    return template


def read_format_template(path: Path, what: str) -> tuple[str, set[str]]:
    """A `str.format` template file and the field names it uses (the rubric of curate's judge too)."""
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    try:
        named = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"{path}: not a valid template ({e}); double literal braces as {{{{ }}}}") from None
    return template, named


def render(template: str, question: str, answer_a: str, answer_b: str) -> str:
    return template.format(question=question, answer_a=answer_a, answer_b=answer_b)


def parse_verdict(reply: str) -> str | None:
    """ "A", "B" or "tie" (any case, one trailing period allowed); None for anything else."""
    word = reply.strip().removesuffix(".").strip().casefold()
    return {"a": "A", "b": "B", "tie": "tie"}.get(word)


@dataclass
class JudgeOutcome:
    """Per example: the candidate's mean score over its parsable verdicts (None when none parsed),
    and the raw replies with their verdicts, candidate-as-A first."""

    scores: list[float | None] = field(default_factory=list)
    replies: list[list[dict]] = field(default_factory=list)
    errors: int = 0
    asked: int = 0

    @property
    def win_rate(self) -> float | None:
        valid = [s for s in self.scores if s is not None]
        return sum(valid) / len(valid) if valid else None


def judge_pairs(
    judge: Generator,
    template: str,
    questions: Sequence[str],
    candidates: Sequence[str],
    opponents: Sequence[str],
) -> JudgeOutcome:
    """Ask the judge about each (candidate, opponent) pair in both orders."""
    if not (len(questions) == len(candidates) == len(opponents)):
        raise ValueError("questions, candidates and opponents must have one entry per example")
    requests = []
    for q, c, o in zip(questions, candidates, opponents, strict=True):
        for a, b in ((c, o), (o, c)):
            prompt = render(template, q, a, b)
            requests.append(
                GenerationRequest([{"role": "user", "content": prompt}], max_new_tokens=JUDGE_MAX_NEW_TOKENS)
            )
    results = judge.generate(requests)
    outcome = JudgeOutcome(asked=len(requests))
    for i in range(len(questions)):
        points, replies = [], []
        for order, result in zip(
            ("candidate_is_A", "candidate_is_B"), results[2 * i : 2 * i + 2], strict=True
        ):
            reply = result.text if result.ok else None
            verdict = parse_verdict(reply) if reply is not None else None
            replies.append({"order": order, "reply": reply, "error": result.error, "verdict": verdict})
            if verdict is None:
                outcome.errors += 1
                continue
            won = "A" if order == "candidate_is_A" else "B"
            points.append(0.5 if verdict == "tie" else float(verdict == won))
        outcome.scores.append(sum(points) / len(points) if points else None)
        outcome.replies.append(replies)
    return outcome
