"""`exemplar curate distill` against a real `transformers serve` on 127.0.0.1 (tests/test_serve.py's
server and fault proxy), and against the same model folder through the local backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exemplar.cli import main
from exemplar.evaluate import GenerationRequest, LocalGenerator
from tests.generation_helpers import TAUGHT
from tests.test_serve import LONG, FaultProxy, model_dir, proxy_factory, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 6
[(LONG_PROMPT, _)] = LONG.items()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture
def prompts(tmp_path) -> list[Path]:
    """Three formats: messages (one two-turn conversation, one prompt only, one too long to
    answer in MAX_NEW_TOKENS), alpaca with a wrong output, prompt/completion."""
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [user("Say hi"), assistant("WRONG"), user("Who are you?"), assistant("WRONG 2")]},
            {"messages": [user("Reverse: a b c")]},
            {"messages": [user(LONG_PROMPT), assistant("...")]},
        ],
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Who are you?", "input": "", "output": "nobody"}]))
    completion = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi", "completion": "bye"}])
    return [chat, alpaca, completion]


def greedy(model_dir: Path, messages: list[dict]) -> str:  # noqa: F811
    generator = LocalGenerator.from_folder(model_dir, device="cpu")
    [result] = generator.generate([GenerationRequest(messages, max_new_tokens=MAX_NEW_TOKENS)])
    return result.text


def distill_args(files: list[Path], out: Path, teacher: str, *extra: str) -> list[str]:
    args = ["curate", "distill", *map(str, files), "--out", str(out), "--teacher", teacher]
    return [*args, "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-progress", *extra]


def test_distill_over_a_server_replaces_every_assistant_turn(server, model_dir, prompts, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(distill_args(prompts, out, str(model_dir), "--base-url", server)) == 0
    kept = read_jsonl(out / "kept.jsonl")
    [removed] = read_jsonl(out / "removed.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert read_jsonl(out / "failed.jsonl") == []
    assert summary["in"] == 5 and summary["kept"] == 4 and summary["failed"] == 0
    assert summary["removed"] == {"truncated": 1}
    assert removed["messages"][0]["content"] == LONG_PROMPT and removed["meta"]["reason"] == "truncated"

    two_turns, prompt_only, alpaca, completion = kept
    # Turn 2 was answered after the teacher's own turn 1, not after "WRONG".
    second = greedy(model_dir, [user("Say hi"), assistant("hi"), user("Who are you?")])
    assert two_turns["messages"] == [user("Say hi"), assistant("hi"), user("Who are you?"), assistant(second)]
    assert prompt_only["messages"] == [user("Reverse: a b c"), assistant(TAUGHT["Reverse: a b c"])]
    assert alpaca["messages"][-1] == assistant(TAUGHT["Who are you?"])
    assert completion["messages"] == [{**user("Say hi"), "train": False}, assistant("hi")]
    assert [r["meta"]["source"]["path"] for r in kept] == [
        str(p) for p in (prompts[0], prompts[0], *prompts[1:])
    ]

    info = two_turns["meta"]["distill"]
    assert info["teacher"] == str(model_dir) and info["base_url"] == server
    assert info["sampling"] == {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    # Every request its own seed, in input order: 2 turns, then one each (the long prompt is seed 3).
    assert [r["meta"]["distill"]["seeds"] for r in kept] == [[0, 1], [2], [4], [5]]
    assert summary["generation"]["requests"] == 6 and summary["generation"]["requests_per_s"] > 0

    # The same folder through the local backend gives the same records.
    local = tmp_path / "local"
    assert main(distill_args(prompts, local, str(model_dir))) == 0
    strip = lambda rows: [{**r, "meta": {**r["meta"], "distill": None}} for r in rows]  # noqa: E731
    assert strip(read_jsonl(local / "kept.jsonl")) == strip(kept)


def test_turns_last_keeps_earlier_turns(server, model_dir, prompts, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(distill_args(prompts[:1], out, str(model_dir), "--base-url", server, "--turns", "last")) == 0
    first = read_jsonl(out / "kept.jsonl")[0]
    last = greedy(model_dir, [user("Say hi"), assistant("WRONG"), user("Who are you?")])
    assert first["messages"] == [user("Say hi"), assistant("WRONG"), user("Who are you?"), assistant(last)]
    assert first["meta"]["distill"]["seeds"] == [0]


def test_failed_prompts_are_reported_and_a_rerun_asks_only_for_them(
    proxy_factory,  # noqa: F811
    model_dir,  # noqa: F811
    prompts,
    tmp_path,
    capsys,
):
    proxy = proxy_factory()
    proxy.fail_prompts = {"Reverse: a b c"}
    out = tmp_path / "out"
    args = distill_args(prompts, out, str(model_dir), "--base-url", proxy.url, "--max-retries", "1")
    assert main(args) == 1
    assert "rerun the same command" in capsys.readouterr().err
    [failed] = read_jsonl(out / "failed.jsonl")
    assert failed["messages"] == [user("Reverse: a b c")]  # the input record, as it was
    assert failed["meta"]["failed_by"] == "distill" and "HTTP 500" in failed["meta"]["error"]
    assert failed["meta"]["source"] == {"path": str(prompts[0]), "row": 2}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["in"], summary["kept"], summary["failed"]) == (5, 3, 1)

    proxy.fail_prompts = set()
    asked = len(proxy.forwarded)
    assert main(args) == 0
    assert proxy.prompts_forwarded()[asked:] == ["Reverse: a b c"]  # the rest came from the cache
    assert read_jsonl(out / "failed.jsonl") == []
    assert [r["messages"][-1]["content"] for r in read_jsonl(out / "kept.jsonl")][1] == "c b a"


class GoesAway(FaultProxy):
    """A server that answers `answers` requests and then drops every connection (as a server
    that went away mid-run), until `back()`."""

    def __init__(self, upstream: str, answers: int):
        super().__init__(upstream)
        self.answers = answers

    def _next_fault(self, body: dict) -> str | None:
        with self.lock:
            return "drop" if len(self.forwarded) >= self.answers else None

    def back(self) -> None:
        self.answers = 10**9


def test_a_server_that_goes_away_mid_run_fails_the_rest_and_a_rerun_completes(
    server,  # noqa: F811
    model_dir,  # noqa: F811
    tmp_path,
):
    rows = [{"messages": [user(f"{p} ({i})")]} for i in range(3) for p in TAUGHT]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    proxy = GoesAway(server, answers=4)
    try:
        out = tmp_path / "out"
        args = distill_args([source], out, str(model_dir), "--base-url", proxy.url)
        args += ["--concurrency", "1", "--max-retries", "1", "--batch-size", "1"]
        assert main(args) == 1
        kept, failed = read_jsonl(out / "kept.jsonl"), read_jsonl(out / "failed.jsonl")
        assert len(kept) == 4 and len(failed) == len(rows) - 4
        assert all("connection failed" in f["meta"]["error"] for f in failed)
        proxy.back()
        assert main(args) == 0
        again = read_jsonl(out / "kept.jsonl")
        assert [r["meta"]["source"]["row"] for r in again] == list(range(1, len(rows) + 1))
        assert read_jsonl(out / "failed.jsonl") == []
        asked = proxy.prompts_forwarded()
        assert sorted(asked) == sorted(r["messages"][0]["content"] for r in rows)  # each asked once
    finally:
        proxy.close()


@pytest.mark.slow  # a second Python process (torch import) killed on purpose
def test_a_killed_distill_rerun_answers_every_prompt_once(proxy_factory, model_dir, tmp_path):  # noqa: F811
    rows = [{"messages": [user(f"{p} ({i})")]} for i in range(6) for p in TAUGHT]  # 18 prompts
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    proxy = proxy_factory(delay_s=0.2)
    out = tmp_path / "out"
    args = distill_args([source], out, str(model_dir), "--base-url", proxy.url, "--concurrency", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "exemplar", *args], env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            if len(proxy.forwarded) >= 10:
                break
            assert process.poll() is None, "distill ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    proxy.wait_idle()
    assert not (out / "summary.json").exists()  # a killed stage publishes nothing
    asked_before = proxy.prompts_forwarded()

    proxy.delay_s = 0.0
    assert main(args) == 0
    kept = read_jsonl(out / "kept.jsonl")
    assert [r["meta"]["source"]["row"] for r in kept] == list(range(1, len(rows) + 1))  # once each, in order
    assert all(r["messages"][-1]["role"] == "assistant" for r in kept)
    asked_again = proxy.prompts_forwarded()[len(asked_before) :]
    # What was answered came from the cache; at most the request in flight at the kill was
    # answered by the server but not stored before the process died.
    assert len(set(asked_again) & set(asked_before)) <= 1
    assert sorted(set(asked_before) | set(asked_again)) == sorted(r["messages"][0]["content"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["cache_hits"] >= len(asked_before) - 1


def always(record: dict) -> bool:
    """A verifier that passes everything (so only emptiness decides)."""
    return True


def test_empty_answers_are_removed_not_kept(tokenizer, im_end, tmp_path):
    """A model taught to answer one prompt with nothing: that answer would be an untrainable
    row, so distill and best-of-k remove it ("empty_response") through the local backend."""
    import torch

    from exemplar.model import save_model
    from tests.generation_helpers import taught_model

    torch.manual_seed(0)
    model = taught_model(tokenizer, {"Say nothing": "", "Say hi": "hi"}, steps=100)
    folder = save_model(model, tokenizer, tmp_path / "run", stop_token_ids=[im_end])["model"]
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"messages": [user("Say nothing")]}, {"messages": [user("Say hi")]}]
    )
    out = tmp_path / "distill"
    assert main(distill_args([source], out, str(folder))) == 0
    [removed] = read_jsonl(out / "removed.jsonl")
    assert removed["meta"]["reason"] == "empty_response" and removed["messages"][0] == user("Say nothing")
    assert [r["messages"][-1] for r in read_jsonl(out / "kept.jsonl")] == [assistant("hi")]

    best = tmp_path / "best"
    args = ["curate", "best-of-k", str(source), "--out", str(best), "--model", str(folder), "--k", "2"]
    args += ["--scorer", f"verifier:{__name__}:always", "--temperature", "0", "--max-new-tokens", "6"]
    assert main([*args, "--no-progress"]) == 0
    assert json.loads((best / "summary.json").read_text())["removed"] == {"empty_response": 1}
    assert [r["messages"][-1] for r in read_jsonl(best / "kept.jsonl")] == [assistant("hi")]
