"""`verifier:module:function`: a user's Python function that gets the record and returns a number or bool.

The module is imported by name (from the current folder or PYTHONPATH) or, when it ends in `.py`,
loaded from that file. An exception in the function is that record's error (reported, the row
removed with reason `score_error`), not the end of the stage.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exemplar.config import Config
from exemplar.curate.scorers.base import Record, Score, number_score
from exemplar.errors import ConfigError


class VerifierScorer:
    def __init__(self, target: str, name: str = "verifier", config: Config | None = None):
        self.name = name
        self.target = target
        self.function = load_function(target)

    def score(self, records: list[Record]) -> list[Score]:
        return [self._one(record) for record in records]

    def _one(self, record: Record) -> Score:
        try:
            value = self.function(record)
        except Exception as e:  # the user's code: any failure is this record's error
            return Score(None, f"{self.target} raised {type(e).__name__}: {e}")
        return number_score(value, self.target)


def load_function(target: str) -> Callable[[Record], Any]:
    module_name, sep, function_name = target.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"verifier spec {target!r}: expected verifier:module:function")
    module = _load_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"verifier {target!r}: module {module_name!r} has no function {function_name!r}")
    return function


def _load_module(name: str):
    """A module by import name; `mymodule` also finds ./mymodule.py, as `python -m` would."""
    if name.endswith(".py"):
        return _module_from_file(Path(name))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        local = Path(*name.split(".")).with_suffix(".py")
        if e.name == name.split(".")[0] and local.is_file():
            return _module_from_file(local)
        raise ConfigError(f"verifier module {name!r} cannot be imported: {e}") from None


def _module_from_file(path: Path):
    if not path.is_file():
        raise ConfigError(f"verifier module file {path} not found")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
