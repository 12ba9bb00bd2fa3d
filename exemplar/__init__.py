"""Exemplar: supervised fine-tuning of causal language models.

    import exemplar

    config = exemplar.load_config("run.yaml")           # or a dict
    summary = exemplar.finetune(config, train_data=rows, callbacks=[on_event])

Names are imported lazily, so `import exemplar` stays cheap (no torch, transformers or datasets
until a function that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the config
    "load_config": "exemplar.config",
    "Config": "exemplar.config",
    # data
    "prepare_data": "exemplar.data.pipeline",
    "PreparedData": "exemplar.data.pipeline",
    "register_format": "exemplar.data.registry",
    "unregister_format": "exemplar.data.registry",
    "read_conversations": "exemplar.data.sources",
    "to_record": "exemplar.data.records",
    "write_records": "exemplar.data.records",
    "Conversation": "exemplar.data.schema",
    "Message": "exemplar.data.schema",
    "TextDocument": "exemplar.data.schema",
    "TokenizedExample": "exemplar.data.schema",
    # training
    "finetune": "exemplar.train.finetune",
    # generation: one interface for local model folders and OpenAI-compatible servers
    "Generator": "exemplar.evaluate.generator",
    "GenerationRequest": "exemplar.evaluate.generator",
    "GenerationResult": "exemplar.evaluate.generator",
    "LocalGenerator": "exemplar.evaluate.local",
    "HttpGenerator": "exemplar.evaluate.http_generator",
    "generate_file": "exemplar.evaluate.file_generation",
    "evaluate_models": "exemplar.evaluate.evaluation",
    # errors
    "ExemplarError": "exemplar.errors",
    "ConfigError": "exemplar.errors",
    "DataError": "exemplar.errors",
    "RowError": "exemplar.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'exemplar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
