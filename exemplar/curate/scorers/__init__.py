"""Scorers for `exemplar curate score` (the contract other stages code against).

- `Score(value, error, detail)`: one record's score; `value` is None only with an `error`.
- `Scorer`: `name` (the key at `meta.scores.NAME`) and `score(records) -> [Score]`, one per record.
- `make_scorer(spec, config)`: a scorer from `verifier:module:function`, `reward:PATH`,
  `judge:MODEL`, `ifd:PATH`, `perplexity:PATH`, `relevance[:PATH]`, optionally `NAME=SPEC`.
- `score_records(records, writer, scorers)`: the stage; a failed score removes the row
  (reason `score_error`), counted in summary.json.
Scores are deterministic: the same records give the same scores.
"""

from exemplar.curate.scorers.base import Record, Score, Scorer
from exemplar.curate.scorers.spec import make_scorer, parse_spec
from exemplar.curate.scorers.stage import score_records

__all__ = ["Record", "Score", "Scorer", "make_scorer", "parse_spec", "score_records"]
