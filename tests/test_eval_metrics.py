"""`exemplar eval`'s metrics, bootstrap and judge parsing on hand-made cases with known answers."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exemplar.errors import ConfigError
from exemplar.evaluate import scoring
from exemplar.evaluate.bootstrap import bootstrap_interval, paired_difference
from exemplar.evaluate.generator import GenerationRequest, GenerationResult, Generator, Sample
from exemplar.evaluate.judge import judge_pairs, load_judge_prompt, parse_verdict, render


def test_exact_normalized_and_contains():
    responses = ["d c b a", " D  C B A ", "the answer is d c b a.", "a b"]
    references = ["d c b a"] * 4
    assert scoring.exact_match(responses, references) == [1.0, 0.0, 0.0, 0.0]
    assert scoring.normalized_match(responses, references) == [1.0, 1.0, 0.0, 0.0]
    assert scoring.contains(responses, references) == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1"):
        scoring.exact_match(["a", "b"], ["a"])


def test_regex_and_bad_regex():
    assert scoring.regex_match(["x = 42", "none", "7"], r"\d+") == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        scoring.regex_match(["a"], "(")


def test_json_validity_and_schema():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name"],
    }
    responses = ['{"name": "Ada", "age": 36}', '{"age": 3}', '{"name": "Bo", "age": -1}', "not json", "[1]"]
    assert scoring.json_valid(responses) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert scoring.json_schema_valid(responses, schema) == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="JSON schema is not valid"):
        scoring.json_schema_valid(responses, {"type": "no-such-type"})


def _verifier_module(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "my_checks.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_checks", None)
    return "my_checks:check"


def test_a_user_verifier_gets_the_record_and_the_response(tmp_path, monkeypatch):
    spec = _verifier_module(
        tmp_path,
        monkeypatch,
        "def check(record, response):\n"
        "    return response.split() == list(reversed(record['messages'][-2]['content'].split()))\n",
    )
    records = [
        {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "c b a"}]}
    ] * 2
    assert scoring.verified(records, ["c b a", "a b c"], scoring.load_verifier(spec)) == [1.0, 0.0]


def test_a_verifier_returning_no_number_is_an_error_naming_the_row(tmp_path, monkeypatch):
    spec = _verifier_module(tmp_path, monkeypatch, "def check(record, response):\n    return 'yes'\n")
    with pytest.raises(ConfigError, match="row 1: it must return a bool or a number"):
        scoring.verified([{}], ["x"], scoring.load_verifier(spec))
    with pytest.raises(ConfigError, match="module:function"):
        scoring.load_verifier("no_colon")
    with pytest.raises(ConfigError, match="has no function"):
        scoring.load_verifier("math:no_such_function")


# -- bootstrap -----------------------------------------------------------------------------------


def test_a_constant_has_a_point_interval():
    interval = bootstrap_interval([1.0] * 50)
    assert (interval.value, interval.low, interval.high) == (1.0, 1.0, 1.0)


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=60), st.integers(0, 5))
def test_the_interval_holds_the_mean_and_is_seeded(values, seed):
    a = bootstrap_interval(values, seed=seed, resamples=300)
    b = bootstrap_interval(values, seed=seed, resamples=300)
    assert a == b
    assert a.low <= a.value <= a.high
    assert a.low >= 0.0 and a.high <= 1.0


def test_the_interval_shrinks_with_n_and_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 100).astype(float)
    large = rng.integers(0, 2, 10_000).astype(float)
    wide, narrow = bootstrap_interval(small), bootstrap_interval(large)
    assert narrow.high - narrow.low < (wide.high - wide.low) / 5
    p = large.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(large))
    assert narrow.low == pytest.approx(p - half, abs=0.003)
    assert narrow.high == pytest.approx(p + half, abs=0.003)


def test_a_ratio_weighs_examples_by_their_tokens():
    interval = bootstrap_interval([2.0, 10.0], [1.0, 4.0])
    assert interval.value == pytest.approx(12 / 5)  # sums over tokens, not the mean of means (2.25)


def test_paired_differences_cancel_what_both_models_share():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 5, 400)
    a = difficulty + 0.5 + rng.normal(0, 0.1, 400)
    b = difficulty
    diff = paired_difference(a, b)
    assert diff.value == pytest.approx(0.5, abs=0.02)
    assert 0.4 < diff.low < diff.high < 0.6  # an unpaired interval would span about +-0.7 here
    same = paired_difference(b, b)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([1.0], [1.0, 2.0])


# -- judge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("A", "A"), (" b ", "B"), ("Tie", "tie"), ("A.", "A"), ("A is better", None), ("", None), ("AB", None)],
)
def test_judge_replies_are_parsed_strictly(reply, verdict):
    assert parse_verdict(reply) == verdict


class ScriptedJudge(Generator):
    """A backend whose replies are a function of the prompt: hand-made judge behaviour."""

    def __init__(self, reply_for):
        super().__init__()
        self.reply_for = reply_for
        self.prompts: list[str] = []
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for request in requests:
            prompt = request.messages[-1]["content"]
            self.prompts.append(prompt)
            self.requests.append(request)
            out.append(GenerationResult((Sample(self.reply_for(prompt), True, "stop"),)))
        return out


def test_each_pair_is_judged_in_both_orders():
    template = load_judge_prompt()

    def first_answer_wins(prompt: str) -> str:  # a judge with pure position bias
        return "A"

    judge = ScriptedJudge(first_answer_wins)
    outcome = judge_pairs(judge, template, ["q1", "q2"], ["good1", "good2"], ["ref1", "ref2"])
    assert judge.prompts == [
        render(template, "q1", "good1", "ref1"),
        render(template, "q1", "ref1", "good1"),
        render(template, "q2", "good2", "ref2"),
        render(template, "q2", "ref2", "good2"),
    ]
    assert outcome.scores == [0.5, 0.5] and outcome.errors == 0  # the swap cancels the bias
    assert all(r.tools is None and r.greedy and r.max_new_tokens == 8 for r in judge.requests)


def test_a_judge_that_prefers_the_candidate_and_one_that_rambles():
    template = load_judge_prompt()
    prefers = ScriptedJudge(lambda p: "A" if p.index("good") < p.index("ref") else "B")
    assert judge_pairs(prefers, template, ["q"], ["good"], ["ref"]).win_rate == 1.0
    rambles = ScriptedJudge(lambda p: "I think A" if p.index("good") < p.index("ref") else "tie")
    outcome = judge_pairs(rambles, template, ["q"], ["good"], ["ref"])
    assert outcome.errors == 1 and outcome.asked == 2 and outcome.scores == [0.5]


def test_a_judge_prompt_must_have_the_three_fields(tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("Which is better? {answer_a} or {answer_b}")
    with pytest.raises(ConfigError, match="exactly the fields"):
        load_judge_prompt(bad)
