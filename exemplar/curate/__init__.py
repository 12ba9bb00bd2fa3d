"""Data curation: stages that read conversation records and write what they keep and remove.

Every stage (`dedup`, `filter`, `mix`, `score`, `select`; `curate run` chains them) writes one folder
(curate/io.py): `kept.jsonl` (records), `removed.jsonl` (each removed record with
`meta.removed_by`, `meta.reason`) and `summary.json` (`{"in", "kept", "removed": {reason: count}}`),
which is written last and is the mark that the stage finished.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from exemplar.errors import ExemplarError

EXTRA_HINT = 'install the curate extra: pip install "exemplar-sft[curate]"'


def require(module: str, what: str) -> ModuleType:
    """Import an optional dependency of the curate extra, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExemplarError(f"{what} needs the Python package '{module}' ({e}); {EXTRA_HINT}") from None
