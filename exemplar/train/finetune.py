"""`finetune(config)`: the whole job behind `exemplar train`, as one library call.

config -> tokenizer and template -> cached, masked data -> model (full / LoRA / QLoRA)
       -> the training loop (checkpoints, metrics) -> OUTPUT/model (and OUTPUT/adapter)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from exemplar.config import Config
from exemplar.errors import ConfigError

log = logging.getLogger(__name__)


def finetune(config: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train as the config says and export the result; returns the training summary."""
    from exemplar.data.pipeline import prepare_data
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.model.export import save_model
    from exemplar.model.loading import load_model
    from exemplar.model.lora import check_method_supported
    from exemplar.train.loop import run_training

    if config.model is None:
        raise ConfigError("training needs a model: set model.path or model.from_config")
    check_method_supported(config.train)  # e.g. QLoRA without CUDA: fail before any work
    bundle = load_tokenizer(config)
    data = prepare_data(config, bundle=bundle, progress=progress)
    for report in data.reports:
        for line in report.lines():
            log.info(line)
    model = load_model(config.model, config.train, bundle.tokenizer, resolve=config.resolve_path)
    summary = run_training(
        config, model, bundle.tokenizer, data.train, data.eval, resume=resume, progress=progress
    )
    written = save_model(
        model, bundle.tokenizer, config.output_dir, data.stop_token_ids, merge=config.train.merge
    )
    summary["outputs"] = {name: str(path) for name, path in written.items()}
    summary["data"] = [report.lines() for report in data.reports]
    path = Path(config.output_dir) / "train_summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return summary
