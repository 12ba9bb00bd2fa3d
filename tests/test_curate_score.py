"""`exemplar curate score`: the scorer contract, the verifier scorer, the stage's output layout."""

from __future__ import annotations

import json
import sys

import pytest

from exemplar.curate.io import StageWriter
from exemplar.curate.scorers import Score, make_scorer, parse_spec, score_records
from exemplar.errors import ConfigError

VERIFIER = """
def exact(record):
    answer = record["messages"][-1]["content"]
    if answer == "boom":
        raise ValueError("cannot check this one")
    if answer == "text":
        return "yes"
    return answer.strip() == "4"

def length(record):
    return len(record["messages"][-1]["content"])
"""


def _record(prompt, response, row):
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        "meta": {"source": {"path": "in.jsonl", "row": row}},
    }


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def verifier_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(VERIFIER, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_checks"


def test_verifier_scores_bool_and_number_and_reports_errors(verifier_module):
    records = [
        _record("2+2?", "4", 1),
        _record("2+2?", "5", 2),
        _record("x", "boom", 3),
        _record("x", "text", 4),
    ]
    scores = make_scorer(f"verifier:{verifier_module}:exact").score(records)
    assert [s.value for s in scores[:2]] == [1.0, 0.0]
    assert scores[2].value is None and "ValueError: cannot check this one" in scores[2].error
    assert scores[3].value is None and "not a number or a bool" in scores[3].error
    assert make_scorer(f"n={verifier_module}:length".replace("n=", "n=verifier:")).name == "n"


def test_score_records_writes_scores_and_removes_failures(tmp_path, verifier_module):
    records = [_record("2+2?", "4", 1), _record("2+2?", "five", 2), _record("x", "boom", 3)]
    scorers = [
        make_scorer(f"verifier:{verifier_module}:exact"),
        make_scorer(f"len=verifier:{verifier_module}:length"),
    ]
    out = tmp_path / "out"
    with StageWriter(out, "score", {}) as writer:
        score_records(records, writer, scorers, batch_size=2, progress=False)
    kept, removed = _read(out / "kept.jsonl"), _read(out / "removed.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["meta"]["scores"] for r in kept] == [{"verifier": 1.0, "len": 1}, {"verifier": 0.0, "len": 4}]
    assert [r["meta"]["source"]["row"] for r in kept] == [1, 2]
    (bad,) = removed
    assert bad["meta"]["reason"] == "score_error" and bad["meta"]["removed_by"] == "score"
    assert bad["meta"]["reason_detail"].startswith("verifier: my_checks:exact raised ValueError")
    assert bad["meta"]["scores"] == {"len": 4}  # what did succeed is kept
    assert summary["removed"] == {"score_error": 1} and summary["score_errors"] == {"verifier": 1, "len": 0}
    assert summary["scores"]["len"] == {"count": 2, "mean": 2.5, "min": 1.0, "max": 4.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope:x", "unknown kind 'nope'"),
        ("reward", "reward needs an argument"),
        ("bad name=verifier:m:f", "must be letters"),
        ("verifier:only_module", "expected verifier:module:function"),
        ("verifier:no_such_module_here:f", "cannot be imported"),
        ("verifier:json:no_such_function", "has no function 'no_such_function'"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_scorer(spec)


def test_spec_names():
    assert parse_spec("relevance") == ("relevance", "relevance", "")
    assert parse_spec("judge:http://127.0.0.1:8000/v1?a=b#m") == (
        "judge",
        "judge",
        "http://127.0.0.1:8000/v1?a=b#m",
    )
    assert parse_spec("q=judge:http://h#m") == ("q", "judge", "http://h#m")


def test_two_scorers_with_one_name_are_refused(tmp_path, verifier_module):
    scorers = [
        make_scorer(f"verifier:{verifier_module}:exact"),
        make_scorer(f"verifier:{verifier_module}:length"),
    ]
    with (
        pytest.raises(ConfigError, match="two scorers write meta.scores.verifier"),
        StageWriter(tmp_path / "o", "score", {}) as writer,
    ):
        score_records([], writer, scorers)


def test_a_scorer_breaking_the_contract_stops_the_stage(tmp_path):
    class Short:
        name = "short"

        def score(self, records):
            return [Score(1.0)] * (len(records) - 1)

    with (
        pytest.raises(RuntimeError, match="returned 1 scores for 2"),
        StageWriter(tmp_path / "o", "score", {}) as writer,
    ):
        score_records([_record("a", "b", 1), _record("c", "d", 2)], writer, [Short()], progress=False)
    assert not (tmp_path / "o" / "summary.json").exists()


# --- the command ---------------------------------------------------------------------------


def _cli(inputs, out, *args):
    from exemplar.cli import main

    assert main(["curate", *args[:1], *map(str, inputs), "--out", str(out), "--no-progress", *args[1:]]) == 0
    return (
        _read(out / "kept.jsonl"),
        _read(out / "removed.jsonl"),
        json.loads((out / "summary.json").read_text()),
    )


def _alpaca(path, rows):
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in rows))
    return path


def test_score_then_filter_by_min_score(tmp_path, verifier_module, capsys):
    data = _alpaca(tmp_path / "in.jsonl", [("2+2?", "4"), ("2+2?", "5"), ("oops", "boom"), ("3+1?", "4 ")])
    kept, removed, summary = _cli(
        [data], tmp_path / "scored", "score", "--scorer", f"ok=verifier:{verifier_module}:exact"
    )
    assert [(r["meta"]["source"]["row"], r["meta"]["scores"]["ok"]) for r in kept] == [
        (1, 1.0),
        (2, 0.0),
        (4, 1.0),
    ]
    assert removed[0]["meta"]["source"] == {"path": str(data), "row": 3}
    assert summary["stage"] == "score" and summary["options"]["scorers"] == [
        f"ok=verifier:{verifier_module}:exact"
    ]
    assert "ok: 1 rows could not be scored" in capsys.readouterr().err
    kept, removed, summary = _cli(
        [tmp_path / "scored" / "kept.jsonl"], tmp_path / "filtered", "filter", "--min-score", "ok=1"
    )
    assert [r["meta"]["source"]["row"] for r in kept] == [1, 4]  # the source is kept through both stages
    assert summary["removed"] == {"min_score": 1} and removed[0]["meta"]["source"]["row"] == 2


def test_missing_extra_names_it(monkeypatch):
    from exemplar.errors import ExemplarError

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if it were not installed
    with pytest.raises(
        ExemplarError, match=r"the relevance scorer needs .*pip install \"exemplar-sft\[curate\]\""
    ):
        make_scorer("relevance:/any/folder")
