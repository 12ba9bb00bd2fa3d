"""The HTTP backend against a real OpenAI-compatible server: `transformers serve` (the `serve` extra)
on 127.0.0.1, serving a model folder this module trains, with a fault-injecting proxy in front."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest

from exemplar.cli import main
from exemplar.data.encode import prompt_encoder
from exemplar.evaluate import GenerationRequest, HttpGenerator, LocalGenerator, chat_loop
from exemplar.evaluate.file_generation import failures_path_of
from tests.generation_helpers import TAUGHT
from tests.serve_helpers import LONG

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [*TAUGHT, *LONG, "Tell me a story", "What is 2+2?", "Reverse: x y", "hi there", "Say bye"]
MAX_NEW_TOKENS = 6
API_KEY = "sk-exemplar-test-Zq81v0secret"


@pytest.fixture(scope="module")
def model_dir(served_model_dir) -> Path:
    return served_model_dir


@pytest.fixture(scope="module")
def server(model_dir, serve) -> str:
    """`transformers serve` on a free 127.0.0.1 port, on the CPU, pinned to the module's model_dir
    (started once per folder in the session: the curate and eval modules import this fixture)."""
    return serve(model_dir)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up or was killed
            super().handle_error(request, client_address)


class FaultProxy:
    """Forwards /v1/chat/completions to the server, first playing `faults` one per request:
    "500", "429" (with Retry-After: 1), "drop" (close the connection unanswered), "slow" (answer
    after `slow_s`, past the client's timeout). Records every forwarded body and auth header."""

    def __init__(self, upstream: str, faults: list[str] = (), delay_s: float = 0.0, slow_s: float = 3.0):
        self.upstream = upstream
        self.faults = list(faults)
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.forwarded: list[dict] = []
        self.arrivals: list[tuple[float, str, str | None]] = []  # (monotonic time, prompt, fault)
        self.auth: set[str | None] = set()
        self.fail_prompts: set[str] = set()  # prompts answered 500 every time
        self.lock = threading.Lock()
        self.in_flight = 0
        self.httpd = QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_idle(self) -> None:
        """Until no request is being handled (one may still be under way after its client died)."""
        for _ in range(400):
            with self.lock:
                if self.in_flight == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("the proxy is still handling a request")

    def prompts_forwarded(self) -> list[str]:
        return [body["messages"][-1]["content"] for body in self.forwarded]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, body: dict) -> str | None:
        with self.lock:
            if body["messages"][-1]["content"] in self.fail_prompts:
                return "500"
            return self.faults.pop(0) if self.faults else None

    def _forward(self, raw: bytes) -> tuple[int, bytes]:
        time.sleep(self.delay_s)
        response = httpx2.post(
            self.upstream + "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        with self.lock:
            self.forwarded.append(json.loads(raw))
        return response.status_code, response.content

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                with proxy.lock:
                    proxy.in_flight += 1
                try:
                    self._answer()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers["content-length"]))
                with proxy.lock:
                    proxy.auth.add(self.headers.get("authorization"))
                body = json.loads(raw)
                fault = proxy._next_fault(body)
                with proxy.lock:
                    proxy.arrivals.append((time.monotonic(), body["messages"][-1]["content"], fault))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)  # the client has given up; it will ask again
                    self.close_connection = True
                    return
                if fault in ("500", "429"):
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", "1")
                    body = b'{"error": "injected"}'
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                status, body = proxy._forward(raw)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture
def proxy_factory(server):
    made: list[FaultProxy] = []

    def make(**kwargs) -> FaultProxy:
        made.append(FaultProxy(server, **kwargs))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture(scope="module")
def local_answers(model_dir) -> list[tuple[str, bool]]:
    generator = LocalGenerator.from_folder(model_dir, device="cpu", batch_size=4)
    requests = [
        GenerationRequest([{"role": "user", "content": p}], max_new_tokens=MAX_NEW_TOKENS) for p in PROMPTS
    ]
    return [(r.text, r.stopped) for r in generator.generate(requests)]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_answers_over_http_are_the_local_backend_s(
    server, model_dir, local_answers, tokenizer, tmp_path
):
    # Same prompt ids on both sides: the server renders with apply_chat_template, the local backend
    # with the training encoder; for ordinary text they agree, so equal texts mean equal decoding.
    encode = prompt_encoder(tokenizer)
    for p in PROMPTS:
        messages = [{"role": "user", "content": p}]
        server_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert encode(messages) == list(server_ids)
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    code = main(
        ["generate", str(model_dir), "--base-url", server, "--input", str(source), "--output", str(out)]
        + ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    )
    assert code == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))
    assert [(r["response"], r["stopped"]) for r in rows] == local_answers
    assert {s for _, s in local_answers} == {True, False}  # both ways of ending are compared
    assert [r["response"] for r in rows[: len(TAUGHT)]] == list(TAUGHT.values())


def test_faults_are_retried_and_every_row_is_answered_once(
    proxy_factory, model_dir, local_answers, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("EXEMPLAR_TEST_KEY", API_KEY)
    proxy = proxy_factory(faults=["500", "429", "drop", "slow", "500"], slow_s=5.0)
    source = write_prompts(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    args = ["generate", str(model_dir), "--base-url", proxy.url, "--input", str(source), "--output", str(out)]
    args += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--api-key-env", "EXEMPLAR_TEST_KEY"]
    args += ["--concurrency", "3", "--timeout", "4", "--max-retries", "8"]
    assert main(args) == 0
    printed = capsys.readouterr()
    rows = read_jsonl(out)
    assert [(r["response"], r["stopped"]) for r in rows] == local_answers  # nothing lost, in order
    assert sorted(proxy.prompts_forwarded()) == sorted(PROMPTS)  # each row reached the server once
    assert "retries 5" in printed.out and "failures 0" in printed.out
    [(refused_at, refused, _)] = [a for a in proxy.arrivals if a[2] == "429"]
    retried_at = min(t for t, prompt, _ in proxy.arrivals if prompt == refused and t > refused_at)
    assert retried_at - refused_at >= 1.0  # Retry-After: 1 was honoured
    assert proxy.auth == {f"Bearer {API_KEY}"}  # the key was sent...
    _assert_key_nowhere(tmp_path, printed.out + printed.err)  # ...and written nowhere

    # A row the server keeps failing is reported with its error; the rows after it wait, the
    # answered ones are cached, and a rerun (the server healthy again) completes the file.
    proxy.fail_prompts = {PROMPTS[2]}
    out2 = tmp_path / "out2.jsonl"
    args2 = [*args[:7], str(out2), *args[8:], "--max-retries", "1"]
    assert main(args2) == 1
    printed = capsys.readouterr()
    [failure] = read_jsonl(failures_path_of(out2))
    assert failure["line"] == 3 and "HTTP 500" in failure["error"] and failure["row"]["prompt"] == PROMPTS[2]
    assert [r["response"] for r in read_jsonl(out2)] == [t for t, _ in local_answers[:2]]
    proxy.fail_prompts = set()
    forwarded_before = len(proxy.forwarded)
    assert main(args2) == 0
    assert [(r["response"], r["stopped"]) for r in read_jsonl(out2)] == local_answers
    assert proxy.prompts_forwarded()[forwarded_before:] == [PROMPTS[2]]  # the rest came from the cache
    assert not failures_path_of(out2).exists()
    _assert_key_nowhere(tmp_path, printed.out + printed.err + capsys.readouterr().out)


def _assert_key_nowhere(folder: Path, printed: str) -> None:
    assert API_KEY not in printed
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files)  # the cache is among the files checked
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow  # a second Python process (torch import) and a run cut short on purpose
def test_a_killed_generate_rerun_completes_the_file(proxy_factory, model_dir, tmp_path, capsys):
    prompts = [f"{p} ({i})" for i in range(3) for p in PROMPTS]  # 24 rows: three batches of 8
    source = write_prompts(tmp_path / "in.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    proxy = proxy_factory(delay_s=0.3)
    args = ["generate", str(model_dir), "--base-url", proxy.url, "--input", str(source), "--output", str(out)]
    args += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--concurrency", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "exemplar", *args], env=env, stderr=subprocess.DEVNULL)
    try:
        # Kill once a batch is written and a few rows of the next one are answered (so cached).
        for _ in range(1200):
            if out.exists() and len(out.read_text().splitlines()) >= 8 and len(proxy.forwarded) >= 11:
                break
            assert process.poll() is None, "generate ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    proxy.wait_idle()
    written_before = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert 8 <= len(written_before) < len(prompts)
    asked_before = proxy.prompts_forwarded()

    proxy.delay_s = 0.0
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == prompts  # every row once, in order
    assert all(isinstance(r["response"], str) and isinstance(r["stopped"], bool) for r in rows)
    asked_again = proxy.prompts_forwarded()[len(asked_before) :]
    # Rows answered before the kill, written or only cached, were not asked again (at most the
    # one in flight when the process died was answered by the server and lost with it).
    assert len(asked_again) == len(set(asked_again))
    assert not set(asked_again) & set(written_before)
    assert len(set(asked_before) - set(written_before) - set(asked_again)) >= 2
    assert sorted(set(asked_before) | set(asked_again)) == sorted(prompts)
    assert f"requests {len(asked_again)}," in printed and "cache hits 0" not in printed


def test_sampled_requests_send_their_seeds_and_replay_from_the_cache(server, model_dir, tmp_path):
    request = GenerationRequest(
        [{"role": "user", "content": "Tell me a story"}], max_new_tokens=8, temperature=5.0, seed=5, n=3
    )
    # One request at a time: transformers serve seeds torch's global generator per request, so
    # concurrent requests would share it.
    with HttpGenerator(server, str(model_dir), concurrency=1, cache_dir=tmp_path / "cache") as first:
        [answer] = first.generate([request])
        assert first.stats.requests == 3
    with HttpGenerator(server, str(model_dir), concurrency=1, cache_dir=tmp_path / "cache") as again:
        [replayed] = again.generate([request])
        assert again.stats.as_dict() == {"requests": 0, "retries": 0, "failures": 0, "cache_hits": 3}
    assert replayed.texts == answer.texts and len(set(answer.texts)) > 1
    with HttpGenerator(
        server, str(model_dir), concurrency=1
    ) as fresh:  # the server honours each sample's seed
        assert fresh.generate([request])[0].texts == answer.texts


def test_chat_over_http_keeps_the_conversation(server, model_dir):
    inputs = iter(["Say hi", "Who are you?", "/exit"])
    out = io.StringIO()
    with HttpGenerator(server, str(model_dir)) as generator:
        history = chat_loop(generator, input_fn=lambda _prompt: next(inputs), output=out, max_new_tokens=20)
    assert [m["content"] for m in history if m["role"] == "assistant"] == ["hi", "I am Exemplar."]
    assert "I am Exemplar.\n" in out.getvalue()


def test_the_rate_limit_spaces_request_starts(proxy_factory, model_dir):
    proxy = proxy_factory()
    requests = [GenerationRequest([{"role": "user", "content": p}], max_new_tokens=4) for p in PROMPTS]
    start = time.monotonic()
    with HttpGenerator(proxy.url, str(model_dir), concurrency=4, rate_limit=10) as generator:
        assert all(r.ok for r in generator.generate(requests))
    # Starts are 0.1 s apart, so the last request cannot arrive before (n - 1) * 0.1 s.
    assert max(t for t, _, _ in proxy.arrivals) - start >= (len(requests) - 1) * 0.1
