"""`finetune(config)`: the whole job behind `exemplar train`, as one library call.

config -> tokenizer and template -> cached, masked data -> model (full / LoRA / QLoRA)
       -> the training loop (checkpoints, metrics) -> OUTPUT/model (and OUTPUT/adapter)

The config holds every option; the call adds only what a YAML file cannot hold: rows in memory,
an already-loaded model and tokenizer, and callbacks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exemplar.config import Config, load_config
from exemplar.errors import ConfigError
from exemplar.fsio import atomic_write_json

log = logging.getLogger(__name__)

Callback = Callable[[str, dict[str, Any]], None]


def finetune(
    config: Config | str | Path | dict[str, Any],
    *,
    train_data: Any = None,
    eval_data: Any = None,
    data_format: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    callbacks: Iterable[Callback] = (),
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train as the config says and export the result; returns the run summary (what
    OUTPUT/train_summary.json holds).

    `config` is a `Config`, or a YAML path or a mapping given to `load_config`. `train_data` /
    `eval_data` are rows in memory (row dicts in any registered format, a `datasets.Dataset`, or
    conversations) that replace `data.train` / `data.eval`; `data_format` names their format
    (detected from the first row when omitted). `model` (a transformers causal LM) and `tokenizer`
    (a fast tokenizer) skip loading; they are still given the config's chat template, special
    tokens, resized embeddings and LoRA wrapping. Each callback is called as callback(event,
    payload) with event "step_end" (payload: the metrics row), "eval" (the eval row),
    "checkpoint" ({"step", "path"}) and "end" (the training loop's summary).

    Under torchrun every rank calls this: it joins the process group (and leaves it at the end when
    it created it). Rank 0 prepares the data first (it writes the cache) while the others wait,
    only rank 0 logs and shows progress, and the final model is gathered and written by rank 0.
    """
    from exemplar.model.lora import check_method_supported
    from exemplar.train.distributed import init_distributed, shutdown
    from exemplar.train.run_guard import output_dir_lock

    if not isinstance(config, Config):
        config = load_config(config)
    if config.model is None and model is None:
        raise ConfigError("training needs a model: set model.path or model.from_config (or pass model=)")
    check_method_supported(config.train)  # e.g. QLoRA without CUDA: fail before any work
    world, owns_group = init_distributed(config.train)
    inputs = _Inputs(train_data, eval_data, data_format, model, tokenizer, list(callbacks))
    # One job per output folder, held from before training to after the export (rank 0 holds it).
    with output_dir_lock(config.output_dir) if world.is_main else contextlib.nullcontext():
        summary = _finetune(config, world, inputs, resume, progress and world.is_main)
    if owns_group:  # not on errors: a rank that fails leaves, and torchrun stops the others
        shutdown()
    return summary


@dataclass
class _Inputs:
    """What the Python call passes besides the config."""

    train_data: Any
    eval_data: Any
    data_format: str | None
    model: Any
    tokenizer: Any
    callbacks: list[Callback]


def _finetune(config: Config, world, inputs: _Inputs, resume: bool, progress: bool) -> dict[str, Any]:
    from exemplar.data.pipeline import prepare_data
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.evaluate.config_section import evaluate_into_summary
    from exemplar.model.export import model_for_export, save_model
    from exemplar.report import REPORT_FILE, record_run_data, report_after_training
    from exemplar.report.run_record import versions
    from exemplar.train.distributed import barrier, broadcast_object, run_in_stages
    from exemplar.train.loop import run_training, seed_everything

    if not world.is_main:
        _quiet_rank()
    bundle = load_tokenizer(config, inputs.tokenizer)
    data = run_in_stages(
        world,
        lambda: prepare_data(
            config,
            bundle=bundle,
            progress=progress,
            train_data=inputs.train_data,
            eval_data=inputs.eval_data,
            data_format=inputs.data_format,
        ),
    )
    if world.is_main:
        for report in data.reports:
            for line in report.lines():
                log.info(line)
    # Anything random while loading (LoRA's initial A matrices, new embedding rows) follows the
    # seed: every rank builds the same model, and N ranks start where one process does.
    seed_everything(config.train.seed)
    model = _model(config, inputs.model, bundle.tokenizer)
    summary = run_training(
        config,
        model,
        bundle.tokenizer,
        data.train,
        data.eval,
        resume=resume,
        callbacks=inputs.callbacks,
        progress=progress,
    )
    export = model_for_export(model, world)  # collective when sharded: the full weights, on rank 0
    written: dict[str, Any] = {}
    if world.is_main:
        written = save_model(
            export, bundle.tokenizer, config.output_dir, data.stop_token_ids, merge=config.train.merge
        )
    del export, model  # the evaluation below loads the saved folder: no second copy in memory
    written = broadcast_object(written, world)
    summary["outputs"] = {name: str(path) for name, path in written.items()}
    summary["data"] = [report.lines() for report in data.reports]
    barrier(world)  # the model folder is complete before any rank returns
    if world.is_main:  # after the barrier: a long evaluation keeps no other rank waiting in it
        summary["versions"] = versions()
        record_run_data(config, data)  # config.yaml and data_stats.json, for the report
        failed = evaluate_into_summary(config, summary)  # the eval: section, when there is one
        summary["outputs"]["report"] = str(Path(config.output_dir) / REPORT_FILE)
        atomic_write_json(Path(config.output_dir) / "train_summary.json", summary)
        if report_after_training(config.output_dir) is None:  # a warning was logged; the model is saved
            del summary["outputs"]["report"]
            atomic_write_json(Path(config.output_dir) / "train_summary.json", summary)
        if failed is not None:
            raise failed
    return summary


def _model(config: Config, given: Any, tokenizer: Any):
    """The config's model loaded, or the given one made ready the same way (`prepare_model`)."""
    from exemplar.model.loading import load_model, prepare_model

    if given is None:
        return load_model(config.model, config.train, tokenizer, resolve=config.resolve_path)
    return prepare_model(given, config.train, tokenizer)


def _quiet_rank() -> None:
    """Ranks other than 0: warnings and errors only, no progress bars."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("exemplar").setLevel(logging.WARNING)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
