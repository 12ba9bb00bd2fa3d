"""The OpenAI-compatible HTTP backend: any server with `/v1/chat/completions` (vLLM, SGLang, the
llama.cpp server, `transformers serve`, a hosted API).

Requests go out concurrently from a thread pool through one `httpx2` client (the HTTP client
`huggingface_hub` already brings; the `openai` client's own retries could not be counted or
told to honour a rate limit). Each sample is one request with its own `seed`; `n` is not sent,
because several servers reject it. Timeouts, dropped connections, 429 and 5xx are retried with
exponential backoff and full jitter, waiting what a `Retry-After` header asks instead when there
is one. Answers are kept in an on-disk `ResponseCache`, so a rerun does not ask again.

The API key is read from an environment variable named by the caller and lives only in the
client's headers: it is never logged, cached, or put into an error message (errors are redacted).
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2

from exemplar.errors import ConfigError
from exemplar.evaluate.generator import (
    GenerationError,
    GenerationRequest,
    GenerationResult,
    Generator,
    Sample,
)
from exemplar.evaluate.response_cache import ResponseCache, request_key


class HttpGenerator(Generator):
    """`Generator` over an OpenAI-compatible server. `base_url` is the server's root or its `/v1`
    (both `http://127.0.0.1:8000` and `http://127.0.0.1:8000/v1` work); `model` is the served
    model's name; `api_key_env` names the environment variable holding the key (none for a local
    server). `rate_limit` caps requests started per second; `cache_dir` enables the cache."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 6,
        rate_limit: float | None = None,
        cache_dir: str | Path | None = None,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        super().__init__()
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ConfigError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"the base URL must start with http:// or https://, got {base_url!r}")
        self.endpoint = _v1(base_url) + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.preferred_batch = max(8, 2 * concurrency)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._secret = _api_key(api_key_env)
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        self._client = httpx2.Client(
            headers=headers,
            timeout=httpx2.Timeout(timeout),
            limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._limiter = RateLimiter(rate_limit)
        self._random = random.Random()
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None

    @property
    def remembers_answers(self) -> bool:
        return self.cache is not None

    def __repr__(self) -> str:  # never the headers
        return f"HttpGenerator({self.endpoint!r}, model={self.model!r})"

    def body_of(self, request: GenerationRequest, seed: int) -> dict[str, Any]:
        """The JSON body for one sample of `request` (what is sent, and what the cache is keyed by)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "seed": seed,
        }
        if not request.greedy:
            body["top_p"] = request.top_p
        if request.tools:
            body["tools"] = request.tools
        return body

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        jobs = [(i, self.body_of(r, seed)) for i, r in enumerate(requests) for seed in r.sample_seeds()]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(lambda job: self._answer(job[1]), jobs))
        samples: list[list[Sample]] = [[] for _ in requests]
        errors: list[str | None] = [None] * len(requests)
        for (i, _), answer in zip(jobs, answers, strict=True):
            if isinstance(answer, Sample):
                samples[i].append(answer)
            elif errors[i] is None:
                errors[i] = answer
        return [
            GenerationResult(error=error) if error else GenerationResult(tuple(found))
            for found, error in zip(samples, errors, strict=True)
        ]

    def close(self) -> None:
        self._client.close()
        if self.cache is not None:
            self.cache.close()

    # ---------------------------------------------------------------------------------------

    def _answer(self, body: dict[str, Any]) -> Sample | str:
        """One sample, from the cache or the server; a string is the error of a sample that failed."""
        key = request_key(self.endpoint, body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.add(cache_hits=1)
                return Sample.from_dict(hit)
        try:
            sample = self._post_with_retries(body)
        except GenerationError as e:
            self.stats.add(failures=1)
            return self._redact(str(e))
        if self.cache is not None:
            self.cache.put(key, body, sample.to_dict())
        return sample

    def _post_with_retries(self, body: dict[str, Any]) -> Sample:
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
            self._limiter.wait()
            self.stats.add(requests=1)
            retry_after = None
            try:
                response = self._client.post(self.endpoint, json=body)
            except httpx2.TimeoutException:
                problem = f"no answer within the {self.timeout:g} s timeout"
            except httpx2.TransportError as e:  # refused, reset, or closed mid-response
                problem = f"connection failed ({type(e).__name__}: {e})"
            else:
                if response.status_code == 200:
                    return _sample_of(response)
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if not _retryable(response.status_code):
                    raise GenerationError(problem)
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            if attempt < self.max_retries:
                time.sleep(retry_after if retry_after is not None else self._backoff(attempt))
        raise GenerationError(f"{problem} (gave up after {self.max_retries + 1} attempts)")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2^attempt], capped, so clients retrying together spread out."""
        return self._random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


class RateLimiter:
    """At most `per_second` request starts per second across threads, evenly spaced. Written here
    because it is a few lines on the stdlib's monotonic clock; None or 0 means no limit."""

    def __init__(self, per_second: float | None):
        if per_second is not None and per_second < 0:
            raise ConfigError(f"rate limit must be positive, got {per_second}")
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _v1(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"the API key variable {env_name} is not set (or empty) in the environment")
    return value


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _sample_of(response: httpx2.Response) -> Sample:
    try:
        data = response.json()
        choice = data["choices"][0]
        content = choice["message"].get("content")
        finish = choice.get("finish_reason") or "unknown"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise GenerationError(f"not a chat completion response ({type(e).__name__}: {e})") from None
    if not isinstance(content, str):
        raise GenerationError(f"the response has no text content (finish_reason {finish!r})")
    tokens = (data.get("usage") or {}).get("completion_tokens")
    return Sample(content, finish == "stop", finish, tokens)
