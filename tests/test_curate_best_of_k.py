"""`exemplar curate best-of-k` against a real `transformers serve` on 127.0.0.1 (tests/test_serve.py's
server), with a verifier that knows the answers: the taught prompts' answers, sampled hot enough
that some samples are wrong, and one prompt the model never learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exemplar.cli import main
from exemplar.curate.best_of_k import BestOfK, distinct
from tests.generation_helpers import TAUGHT
from tests.test_serve import model_dir, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
UNLEARNED = ("What is 2+2?", "4")
VERIFIER = f"verifier:{__name__}:correct"


def correct(record: dict) -> bool:
    """The verifier: the response is the reference answer (meta.reference, from the input)."""
    return record["messages"][-1]["content"] == record["meta"]["reference"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path) -> Path:
    rows = [*TAUGHT.items(), UNLEARNED]
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in rows
        )
    )
    return path


def run(server: str, model_dir: Path, prompts: Path, out: Path, *extra: str) -> dict:  # noqa: F811
    args = ["curate", "best-of-k", str(prompts), "--out", str(out), "--model", str(model_dir)]
    args += ["--base-url", server, "--k", str(K), "--scorer", VERIFIER, "--temperature", "2.0"]
    # One request at a time: transformers serve seeds one global generator per request.
    args += ["--max-new-tokens", "8", "--concurrency", "1", "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_rejection_sampling_keeps_only_verified_answers(server, model_dir, prompts, tmp_path):  # noqa: F811
    out = tmp_path / "best"
    summary = run(server, model_dir, prompts, out, "--min-score", "1")
    kept, removed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "removed.jsonl")
    assert kept and all(correct(r) for r in kept)
    assert all(r["meta"]["scores"]["verifier"] == 1.0 for r in kept)
    assert UNLEARNED[0] in [r["messages"][0]["content"] for r in removed]
    assert {r["meta"]["reason"] for r in removed} == {"below_min_score"}
    assert summary["in"] == len(TAUGHT) + 1 and summary["kept"] + len(removed) == summary["in"]

    # pass@1 from every sample's verdict, pass@K from the prompts with one correct sample.
    verdicts = [r["meta"]["best_of_k"]["scores"] for r in kept + removed]
    assert all(len(v) == K for v in verdicts)
    rates = summary["pass_rate"]
    assert rates["at_1"] == pytest.approx(sum(sum(v) for v in verdicts) / (K * len(verdicts)), abs=1e-4)
    assert rates["at_k"] == pytest.approx(len(kept) / len(verdicts), abs=1e-4)
    assert rates["at_k"] >= rates["at_1"] and 0 < rates["at_1"] < 1  # some samples wrong, some right
    assert summary["scores"]["values"] == {
        "0": sum(v.count(0.0) for v in verdicts),
        "1": sum(v.count(1.0) for v in verdicts),
    }

    # Each sample had its own seed, and the seed is in meta.
    first = kept[0]["meta"]["best_of_k"]
    assert first["k"] == K and first["sampling"]["temperature"] == 2.0
    seeds = [r["meta"]["best_of_k"]["seed"] for r in kept]
    assert len(set(seeds)) == len(seeds)

    # A rerun is answered from the cache in OUT/http_cache: the same folder, no request sent.
    again = run(server, model_dir, prompts, out, "--min-score", "1")
    assert again["generation"]["requests"] == 0 and again["generation"]["cache_hits"] == K * summary["in"]
    assert read_jsonl(out / "kept.jsonl") == kept


def test_all_passing_keeps_every_correct_sample_and_distinct_passing_one_of_each(
    server,  # noqa: F811
    model_dir,  # noqa: F811
    prompts,
    tmp_path,
):
    every = run(server, model_dir, prompts, tmp_path / "all", "--keep", "all-passing")
    rows = read_jsonl(tmp_path / "all" / "kept.jsonl")
    verdicts = {r["messages"][0]["content"]: r["meta"]["best_of_k"]["scores"] for r in rows}
    assert len(rows) == sum(sum(v) for v in verdicts.values()) and all(correct(r) for r in rows)
    assert every["kept_prompts"] == len(verdicts) and every["kept"] == len(rows)

    # The correct answers of one prompt are all the same text: one row per prompt is left.
    distinct_summary = run(server, model_dir, prompts, tmp_path / "distinct", "--keep", "distinct-passing")
    distinct_rows = read_jsonl(tmp_path / "distinct" / "kept.jsonl")
    assert [r["messages"][0]["content"] for r in distinct_rows] == list(verdicts)
    assert distinct_summary["near_duplicates_dropped"] == len(rows) - len(distinct_rows)


def test_distinct_keeps_different_reasoning_and_drops_near_copies():
    texts = [
        "First add 2 and 3 to get 5, then multiply by 4 to get 20. The answer is 20.",
        "First add 2 and 3 to get 5, then multiply by 4 to get 20.  The answer is 20!",  # a near copy
        "4 times 5 is 20, and 5 is 2 plus 3, so the answer is 20.",
        "FIRST ADD 2 AND 3 TO GET 5, THEN MULTIPLY BY 4 TO GET 20. THE ANSWER IS 20.",  # same, normalised
    ]
    rows = [{"messages": [{"role": "assistant", "content": t}]} for t in texts]
    assert distinct(rows, [0, 1, 2, 3], threshold=0.8) == [0, 2]
    assert distinct(rows, [2, 1, 0, 3], threshold=0.8) == [2, 1]


def test_best_of_k_options_are_checked():
    from exemplar.errors import ConfigError

    with pytest.raises(ConfigError, match="--k"):
        BestOfK(0)
    with pytest.raises(ConfigError, match="--distinct-threshold"):
        BestOfK(2, distinct_threshold=0)
