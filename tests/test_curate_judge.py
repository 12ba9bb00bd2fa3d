"""The LLM judge scorer: answer parsing, rubric files, and a judge model taught to grade, answered
locally and by a real `transformers serve` on 127.0.0.1 (the fixtures of tests/test_serve.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exemplar.cli import main
from exemplar.curate.scorers import make_scorer
from exemplar.curate.scorers.judge import default_rubric_path, load_rubric, parse_answer
from exemplar.errors import ConfigError
from tests.scorer_helpers import taught_model_dir
from tests.test_serve import server  # noqa: F401 - the fixture, serving this module's model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

RUBRIC = "Grade: {prompt} => {response}"
# What the taught judge answers for each (prompt, response): two grades and one unparsable reply.
GRADED = {
    ("What is 2+2?", "4"): "Correct. Score: 9",
    ("Capital of France?", "Berlin"): "Wrong city. Score: 2",
    ("Name a colour", "blue"): "I cannot tell.",
}
MAX_NEW = "curate.score.judge_max_new_tokens=24"


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """The judge: a tiny model taught to answer the rendered rubric of each graded pair."""
    answers = {RUBRIC.format(prompt=p, response=r): a for (p, r), a in GRADED.items()}
    return taught_model_dir(tokenizer, answers, tmp_path_factory.mktemp("judge") / "run", steps=200)


@pytest.fixture
def graded_file(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"instruction": p, "output": r} for p, r in GRADED]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rubric.txt").write_text(RUBRIC)
    return path


def _score(inputs, out, *args):
    assert main(["curate", "score", str(inputs), "--out", str(out), "--no-progress", *args]) == 0
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    return kept, removed, json.loads((out / "summary.json").read_text())


def _check_graded(kept, removed, summary):
    assert [(r["meta"]["source"]["row"], r["meta"]["scores"]["judge"]) for r in kept] == [(1, 9.0), (2, 2.0)]
    assert [r["meta"]["score_details"]["judge"]["rationale"] for r in kept] == ["Correct.", "Wrong city."]
    (bad,) = removed
    assert bad["meta"]["source"]["row"] == 3 and bad["meta"]["reason"] == "score_error"
    assert bad["meta"]["reason_detail"].startswith(
        "judge: no 'Score: N' in the judge's answer 'I cannot tell."
    )
    assert summary["removed"] == {"score_error": 1} and summary["score_errors"] == {"judge": 1}


def test_a_local_judge_grades_with_the_users_rubric(model_dir, graded_file, tmp_path):
    rubric = str(tmp_path / "rubric.txt")
    _check_graded(
        *_score(
            graded_file,
            tmp_path / "out",
            "--scorer",
            f"judge:{model_dir}",
            "--rubric",
            rubric,
            "--set",
            MAX_NEW,
        )
    )


@pytest.mark.slow  # starting transformers serve
def test_a_served_judge_grades_the_same_and_twice_alike(server, model_dir, graded_file, tmp_path):  # noqa: F811
    args = [
        "--scorer",
        f"judge:{server}#{model_dir}",
        "--rubric",
        str(tmp_path / "rubric.txt"),
        "--set",
        MAX_NEW,
    ]
    _check_graded(*_score(graded_file, tmp_path / "a", *args))
    _score(graded_file, tmp_path / "b", *args)
    for name in ("kept.jsonl", "removed.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(
    ("answer", "score", "rationale"),
    [
        ("Fine.\nScore: 7", 7.0, "Fine."),
        ("**Score:** 8/10 because it is right", 8.0, "because it is right"),
        ("score = 3.5", 3.5, ""),
        ("Score: 2 at first, then Score: 6", 6.0, "Score: 2 at first, then"),
    ],
)
def test_parse_answer(answer, score, rationale):
    verdict = parse_answer(answer)
    assert (verdict.score, verdict.rationale, verdict.error) == (score, rationale, None)


@pytest.mark.parametrize(
    ("answer", "error"),
    [("Score: 11", "outside 1-10"), ("Score: 0", "outside 1-10"), ("seven", "no 'Score: N'")],
)
def test_unparsable_answers_are_errors(answer, error):
    verdict = parse_answer(answer)
    assert verdict.score is None and error in verdict.error


@given(st.integers(1, 10), st.text(st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_any_rationale_then_a_score_line_parses(value, text):
    verdict = parse_answer(f"{text}\nScore: {value}")
    assert (verdict.score, verdict.rationale, verdict.error) == (value, text.strip(), None)


def test_rubric_files(tmp_path):
    rubric = load_rubric()
    assert rubric == default_rubric_path().read_text() and "{prompt}" in rubric and "{response}" in rubric
    (tmp_path / "no_response.txt").write_text("Rate {prompt}")
    (tmp_path / "other.txt").write_text("Rate {response} for {question}")
    for name in ("no_response.txt", "other.txt"):
        with pytest.raises(ConfigError, match="a rubric uses {response} and optionally {prompt}"):
            load_rubric(tmp_path / name)
    with pytest.raises(ConfigError, match="cannot read the rubric"):
        load_rubric(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="URL#served-name"):
        make_scorer("judge:http://127.0.0.1:1/v1")
