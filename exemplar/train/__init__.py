"""The training engine: packing-aware batching, chunked loss, the loop, checkpoints and metrics.

    from exemplar.train import run_training
    summary = run_training(config, model, tokenizer, train_ds, eval_ds, resume=False)

Names are imported lazily so that `import exemplar.train` stays cheap (no torch until used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_training": "exemplar.train.loop",
    "train_step": "exemplar.train.loop",
    "evaluate": "exemplar.evaluate.likelihood",
    "TrainPlan": "exemplar.train.batching",
    "LMLoss": "exemplar.train.loss",
    "latest_checkpoint": "exemplar.train.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'exemplar.train' has no attribute {name!r}")
