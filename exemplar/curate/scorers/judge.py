"""`judge:MODEL`: an LLM rates each answer from 1 to 10 with a rubric, over the generation backend.

MODEL is a local model folder (`LocalGenerator`) or `URL#served-name` for an OpenAI-compatible
server (`HttpGenerator`). The rubric is a `str.format` template with `{response}` and optionally
`{prompt}` (double any other braces); the default is `exemplar/assets/judge_rubric.txt`, a user's
comes from `curate.score.rubric` (`--rubric FILE`). The judge answers greedily (temperature 0,
seed 0), so the same records get the same answers from the same model.

The score is the last `Score: N` in the answer (any case; `**Score:** 7` and `Score: 7/10` too),
N a number from 1 to 10; the rest of the answer is the rationale, written to
`meta.score_details.NAME.rationale`. An answer without a score in range is that record's error
(counted and reported), never a default score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from exemplar.config import Config
from exemplar.curate.scorers.base import Record, Score
from exemplar.curate.scorers.parts import Turn, last_turn, score_each
from exemplar.errors import ConfigError
from exemplar.evaluate.generator import GenerationRequest, Generator
from exemplar.evaluate.judge import read_format_template

FIELDS = {"prompt", "response"}
LOW, HIGH = 1.0, 10.0
_SCORE = re.compile(r"\**\bscore\s*\**\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\b)?\**", re.IGNORECASE)


def default_rubric_path() -> Path:
    return Path(str(resources.files("exemplar").joinpath("assets/judge_rubric.txt")))


def load_rubric(path: str | Path | None = None) -> str:
    path = Path(path) if path else default_rubric_path()
    template, named = read_format_template(path, "the rubric")
    if "response" not in named or not named <= FIELDS:
        raise ConfigError(
            f"{path}: a rubric uses {{response}} and optionally {{prompt}}, found {sorted(named) or 'no fields'}"
        )
    return template


@dataclass(frozen=True)
class Verdict:
    score: float | None
    rationale: str
    error: str | None = None


def parse_answer(answer: str) -> Verdict:
    """The last `Score: N` of a judge's answer, and the answer without it as the rationale."""
    found = list(_SCORE.finditer(answer))
    if not found:
        return Verdict(None, answer.strip(), f"no 'Score: N' in the judge's answer {answer[:200]!r}")
    last = found[-1]
    value = float(last.group(1))
    rationale = (answer[: last.start()] + answer[last.end() :]).strip()
    if not LOW <= value <= HIGH:
        return Verdict(None, rationale, f"the judge's score {last.group(1)} is outside 1-10")
    return Verdict(value, rationale)


class JudgeScorer:
    def __init__(self, target: str, name: str = "judge", config: Config | None = None):
        options = config.curate.score if config is not None else None
        self.name = name
        self.rubric = load_rubric(config.resolve_path(options.rubric) if options and options.rubric else None)
        self.max_new_tokens = options.judge_max_new_tokens if options else 256
        self.generator = _generator(target, config)

    def score(self, records: list[Record]) -> list[Score]:
        return score_each(records, last_turn, self._judge)

    def _judge(self, turns: list[Turn]) -> list[Score]:
        requests = [
            GenerationRequest(
                [{"role": "user", "content": self.rubric.format(prompt=t.prompt_text, response=t.response)}],
                max_new_tokens=self.max_new_tokens,
            )
            for t in turns
        ]
        scores = []
        for result in self.generator.generate(requests):
            if not result.ok:
                scores.append(Score(None, f"the judge request failed: {result.error}"))
                continue
            verdict = parse_answer(result.text)
            scores.append(Score(verdict.score, verdict.error, {"rationale": verdict.rationale}))
        return scores

    def close(self) -> None:
        self.generator.close()


def _generator(target: str, config: Config | None) -> Generator:
    from exemplar.evaluate.evaluation import ModelSpec

    spec = ModelSpec.parse(f"judge={target}", "--scorer judge:")
    if spec.local:
        from exemplar.evaluate.local import LocalGenerator

        return LocalGenerator.from_folder(spec.path)
    from exemplar.evaluate.http_generator import HttpGenerator

    return HttpGenerator(spec.url, spec.served)
