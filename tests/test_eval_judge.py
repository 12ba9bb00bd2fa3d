"""The judge and a served model in `exemplar eval`, against a real `transformers serve` on
127.0.0.1 (the fixtures of tests/test_serve.py) behind a proxy that records every request."""

from __future__ import annotations

import json

import pytest

from exemplar.evaluate.evaluation import ModelSpec, evaluate_models
from exemplar.evaluate.judge import parse_verdict, render
from tests.generation_helpers import TAUGHT
from tests.test_serve import LONG, FaultProxy, model_dir, server  # noqa: F401 - fixtures

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

JUDGE_PROMPT = "Question: {question}\nFirst: {answer_a}\nSecond: {answer_b}\nBetter (A, B or tie)?"


def test_the_judge_sees_the_users_prompt_in_both_orders(server, model_dir, tmp_path):  # noqa: F811
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in {**TAUGHT, **LONG}.items()
        )
    )
    prompt_file = tmp_path / "judge.txt"
    prompt_file.write_text(JUDGE_PROMPT)
    proxy = FaultProxy(server)
    try:
        result = evaluate_models(
            [f"local={model_dir}", f"served={server}#{model_dir}"],
            heldout,
            tmp_path / "out",
            judge=ModelSpec.parse(f"judge={proxy.url}#{model_dir}", "--judge"),
            judge_prompt=str(prompt_file),
            max_new_tokens=8,
            device="cpu",
        )
        forwarded = [body["messages"][-1]["content"] for body in proxy.forwarded]
    finally:
        proxy.close()
    models = result["models"]
    # the served model answers like the local folder (the long answer is cut at 8 tokens); it has
    # generation metrics only
    assert models["served"]["exact_match"] == models["local"]["exact_match"] == 0.75
    assert models["local"]["truncated_rate"] == 0.25
    assert "nll" not in models["served"] and models["local"]["nll"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "eval_examples.jsonl").read_text().splitlines()]
    # each answer against its reference, asked in both orders, with the user's prompt file
    questions = [*TAUGHT, *LONG]
    expected = [
        render(JUDGE_PROMPT, questions[r["index"]], *pair)
        for r in rows
        for pair in ((r["response"], r["reference"]), (r["reference"], r["response"]))
    ]
    assert len(expected) == 2 * 2 * len(questions)
    assert any(r["response"] != r["reference"] for r in rows)
    # identical requests (an answer equal to its reference reads the same in both orders; the two
    # models answer alike) may be answered from the response cache instead of the server
    assert set(forwarded) == set(expected) and len(forwarded) <= len(expected)
    for name in ("local", "served"):
        replies = [reply for r in rows if r["model"] == name for reply in r["judge"]]
        assert [reply["order"] for reply in replies] == ["candidate_is_A", "candidate_is_B"] * len(questions)
        unparsable = sum(parse_verdict(reply["reply"] or "") is None for reply in replies)
        assert models[name]["judge_asked"] == 2 * len(questions)
        assert models[name]["judge_errors"] == unparsable
        parsed = [r["win_rate"] for r in rows if r["model"] == name and r["win_rate"] is not None]
        if parsed:
            assert models[name]["win_rate"] == pytest.approx(sum(parsed) / len(parsed))
        else:
            assert models[name]["win_rate"] is None
