"""`finetune(config)`: the whole job behind `exemplar train`, as one library call.

config -> tokenizer and template -> cached, masked data -> model (full / LoRA / QLoRA)
       -> the training loop (checkpoints, metrics) -> OUTPUT/model (and OUTPUT/adapter)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from exemplar.config import Config
from exemplar.errors import ConfigError
from exemplar.fsio import atomic_write_json

log = logging.getLogger(__name__)


def finetune(config: Config, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train as the config says and export the result; returns the training summary.

    Under torchrun every rank calls this: it joins the process group (and leaves it at the end when
    it created it). Rank 0 prepares the data first (it writes the cache) while the others wait,
    only rank 0 logs and shows progress, and the final model is gathered and written by rank 0.
    """
    from exemplar.model.lora import check_method_supported
    from exemplar.train.distributed import init_distributed, shutdown

    if config.model is None:
        raise ConfigError("training needs a model: set model.path or model.from_config")
    check_method_supported(config.train)  # e.g. QLoRA without CUDA: fail before any work
    world, owns_group = init_distributed(config.train)
    summary = _finetune(config, world, resume, progress and world.is_main)
    if owns_group:  # not on errors: a rank that fails leaves, and torchrun stops the others
        shutdown()
    return summary


def _finetune(config: Config, world, resume: bool, progress: bool) -> dict[str, Any]:
    from exemplar.data.pipeline import prepare_data
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.model.export import model_for_export, save_model
    from exemplar.model.loading import load_model
    from exemplar.train.distributed import barrier, broadcast_object, run_in_stages
    from exemplar.train.loop import run_training, seed_everything

    if not world.is_main:
        _quiet_rank()
    bundle = load_tokenizer(config)
    data = run_in_stages(world, lambda: prepare_data(config, bundle=bundle, progress=progress))
    if world.is_main:
        for report in data.reports:
            for line in report.lines():
                log.info(line)
    # Anything random while loading (LoRA's initial A matrices, new embedding rows) follows the
    # seed: every rank builds the same model, and N ranks start where one process does.
    seed_everything(config.train.seed)
    model = load_model(config.model, config.train, bundle.tokenizer, resolve=config.resolve_path)
    summary = run_training(
        config, model, bundle.tokenizer, data.train, data.eval, resume=resume, progress=progress
    )
    export = model_for_export(model, world)  # collective when sharded: the full weights, on rank 0
    written: dict[str, Any] = {}
    if world.is_main:
        written = save_model(
            export, bundle.tokenizer, config.output_dir, data.stop_token_ids, merge=config.train.merge
        )
    del export
    written = broadcast_object(written, world)
    summary["outputs"] = {name: str(path) for name, path in written.items()}
    summary["data"] = [report.lines() for report in data.reports]
    if world.is_main:
        path = Path(config.output_dir) / "train_summary.json"
        atomic_write_json(path, summary)
    barrier(world)  # the model folder is complete before any rank returns
    return summary


def _quiet_rank() -> None:
    """Ranks other than 0: warnings and errors only, no progress bars."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("exemplar").setLevel(logging.WARNING)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
