"""Per-example generation metrics: pure functions of (response, reference), one value per example.

Each function returns a list with one number per example (1.0/0.0 for checks), so the run can
average them and bootstrap their intervals over the same examples (`exemplar.evaluate.bootstrap`).

- exact_match: the response equals the reference after trimming surrounding whitespace only.
- normalized_match: equal after `normalize` (casefold, whitespace runs collapsed).
- contains: the normalised reference occurs inside the normalised response.
- regex_match: the pattern matches somewhere in the response (`re.search`).
- json_valid / json_schema_valid: the response parses as JSON / and conforms to a JSON schema
  (the `jsonschema` library, with the validator class the schema's `$schema` names).
- verifier: a user's `module:function(record, response) -> bool | number`.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from exemplar.errors import ConfigError
from exemplar.evaluate.metrics import normalize

Verifier = Callable[[dict[str, Any], str], Any]


def _paired(responses: Sequence[str], references: Sequence[str]) -> None:
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")


def exact_match(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    _paired(responses, references)
    return [float(r.strip() == ref.strip()) for r, ref in zip(responses, references, strict=True)]


def normalized_match(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    _paired(responses, references)
    return [float(normalize(r) == normalize(ref)) for r, ref in zip(responses, references, strict=True)]


def contains(responses: Sequence[str], references: Sequence[str]) -> list[float]:
    _paired(responses, references)
    return [float(normalize(ref) in normalize(r)) for r, ref in zip(responses, references, strict=True)]


def compile_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--regex {pattern!r} is not a valid regular expression: {e}") from None


def regex_match(responses: Sequence[str], pattern: str | re.Pattern[str]) -> list[float]:
    compiled = compile_regex(pattern) if isinstance(pattern, str) else pattern
    return [float(compiled.search(r) is not None) for r in responses]


def _parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def json_valid(responses: Sequence[str]) -> list[float]:
    return [float(_parse_json(r)[0]) for r in responses]


def schema_validator(schema: dict[str, Any]) -> Any:
    """A validator for `schema`; a schema that is itself invalid is a ConfigError, not a 0 score."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"the JSON schema is not valid: {e.message}") from None
    return cls(schema)


def json_schema_valid(responses: Sequence[str], schema: dict[str, Any] | Any) -> list[float]:
    validator = schema_validator(schema) if isinstance(schema, dict) else schema
    scores = []
    for response in responses:
        ok, value = _parse_json(response)
        scores.append(float(ok and validator.is_valid(value)))
    return scores


def load_verifier(spec: str) -> Verifier:
    """`module:function` -> the function (the module is imported as Python imports any module)."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"--verifier must be module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--verifier {spec!r}: cannot import {module_name!r}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--verifier {spec!r}: {module_name} has no function {function_name!r}")
    return function


def verified(records: Sequence[dict[str, Any]], responses: Sequence[str], verifier: Verifier) -> list[float]:
    """The verifier's verdict per example: True/False as 1/0, or its number. Anything else (or an
    exception) stops the run with the row named: a score the user did not write is never made up."""
    scores = []
    for i, (record, response) in enumerate(zip(records, responses, strict=True)):
        try:
            value = verifier(record, response)
        except Exception as e:
            raise ConfigError(f"the verifier failed on held-out row {i + 1}: {type(e).__name__}: {e}") from e
        if isinstance(value, bool | int | float) and value == value:
            scores.append(float(value))
        else:
            raise ConfigError(
                f"the verifier returned {value!r} for held-out row {i + 1}: it must return a bool or a number"
            )
    return scores
