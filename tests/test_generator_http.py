"""The HTTP backend's configuration and request bodies (the server tests are in test_serve.py)."""

from __future__ import annotations

import pytest

from exemplar.errors import ConfigError
from exemplar.evaluate import GenerationRequest, HttpGenerator

SECRET = "sk-unit-test-9f3kq"


def test_the_api_key_comes_from_the_named_variable_and_is_not_shown(monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    with HttpGenerator("http://127.0.0.1:9/v1", "m", api_key_env="MY_KEY") as generator:
        assert SECRET not in repr(generator) and SECRET not in str(vars(generator).get("endpoint"))
        body = generator.body_of(GenerationRequest([{"role": "user", "content": "q"}]), seed=0)
        assert SECRET not in str(body)


def test_a_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY is not set"):
        HttpGenerator("http://127.0.0.1:9", "m", api_key_env="NO_SUCH_KEY")


@pytest.mark.parametrize("base", ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"])
def test_base_url_with_or_without_v1(base):
    with HttpGenerator(base, "m") as generator:
        assert generator.endpoint == "http://h:1/v1/chat/completions"


def test_each_sample_is_one_body_with_its_own_seed():
    request = GenerationRequest([{"role": "user", "content": "q"}], temperature=0.7, top_p=0.9, seed=10, n=3)
    with HttpGenerator("http://h:1", "served") as generator:
        bodies = [generator.body_of(request, seed) for seed in request.sample_seeds()]
    assert [b["seed"] for b in bodies] == [10, 11, 12]
    assert all("n" not in b and b["model"] == "served" and b["top_p"] == 0.9 for b in bodies)
    assert bodies[0]["max_tokens"] == 256 and bodies[0]["temperature"] == 0.7


def test_unreachable_server_is_a_row_error_after_the_retries():
    # Port 9 (discard) is closed on 127.0.0.1: every attempt is refused.
    with HttpGenerator("http://127.0.0.1:9", "m", max_retries=2, backoff_base=0.0) as generator:
        [result] = generator.generate([GenerationRequest([{"role": "user", "content": "q"}])])
        assert not result.ok and "connection failed" in result.error and "3 attempts" in result.error
        assert generator.stats.as_dict() == {"requests": 3, "retries": 2, "failures": 1, "cache_hits": 0}
    with pytest.raises(ValueError, match="failed"):
        result.text  # noqa: B018 - a failed result has no text, never an empty one


def test_a_base_url_without_a_scheme_is_refused():
    with pytest.raises(ConfigError, match="http:// or https://"):
        HttpGenerator("127.0.0.1:8000", "m")
