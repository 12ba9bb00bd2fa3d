"""`make_scorer(spec)`: a scorer from its command-line spec.

Specs: `verifier:module:function`, `reward:PATH`, `judge:MODEL` (a local folder, or
`URL#served-name` for an OpenAI-compatible server), `ifd:PATH`, `perplexity:PATH`,
`relevance[:PATH]`; a leading `NAME=` sets the meta.scores key (default: the kind).
Each family lives in its own module, imported only when used (their dependencies are optional).
"""

from __future__ import annotations

import importlib
import re

from exemplar.config import Config
from exemplar.curate.scorers.base import Scorer
from exemplar.errors import ConfigError

# kind -> (module, class); every class takes (argument, name, config).
_FAMILIES = {
    "verifier": ("verifier", "VerifierScorer"),
    "reward": ("reward", "RewardScorer"),
    "judge": ("judge", "JudgeScorer"),
    "ifd": ("likelihood", "IfdScorer"),
    "perplexity": ("likelihood", "PerplexityScorer"),
    "relevance": ("relevance", "RelevanceScorer"),
}
KINDS = tuple(_FAMILIES)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_spec(spec: str) -> tuple[str, str, str]:
    """(name, kind, argument) of a spec; the name defaults to the kind."""
    name, sep, rest = spec.partition("=")
    if not sep or ":" in name:  # "=" inside a path or URL is not a name
        name, rest = "", spec
    kind, _, argument = rest.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ConfigError(f"scorer spec {spec!r}: unknown kind {kind!r}; one of {', '.join(KINDS)}")
    name = name.strip() or kind
    if not _NAME.match(name):
        raise ConfigError(f"scorer spec {spec!r}: name {name!r} must be letters, digits, _ . -")
    if not argument and kind != "relevance":
        raise ConfigError(f"scorer spec {spec!r}: {kind} needs an argument, e.g. {_EXAMPLES[kind]}")
    return name, kind, argument


_EXAMPLES = {
    "verifier": "verifier:mymodule:check",
    "reward": "reward:path/to/reward-model",
    "judge": "judge:path/to/model or judge:http://127.0.0.1:8000#served-name",
    "ifd": "ifd:path/to/causal-lm",
    "perplexity": "perplexity:path/to/causal-lm",
}


def make_scorer(spec: str, config: Config | None = None) -> Scorer:
    name, kind, argument = parse_spec(spec)
    module, cls = _FAMILIES[kind]
    family = getattr(importlib.import_module(f"exemplar.curate.scorers.{module}"), cls)
    return family(argument or None, name, config)
