"""The `eval:` section of a training config: `exemplar eval` on the model a run exports.

`check_eval_section` runs when the config is loaded, so a missing held-out file, a verifier that
does not import or a bad schema stops `exemplar train` before any training, not after hours of it.
`evaluate_after_training` runs at the end of the run, on OUTPUT/model, and writes OUTPUT/eval/ (the
same eval.json, eval_examples.jsonl and eval.md as the command).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from exemplar.errors import ConfigError, ExemplarError

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
BASE_NAME = "base"


class EvaluationFailed(ExemplarError):
    """The config's eval: section failed at the end of a run whose model was saved."""


def check_eval_section(config: Any, source: str = "config") -> None:
    """Every file, model folder, name and function the section names, checked now (ConfigError)."""
    section = config.eval
    where = f"{source}: eval"
    if config.train.method != "full" and not config.train.merge:
        raise ConfigError(
            f"{where}: a {config.train.method} run exports an adapter, and the evaluation needs a whole "
            "model folder: set train.merge: true (the merged model is evaluated)"
        )
    for key in ("data", "shots", "general", "json_schema", "judge_prompt"):
        value = getattr(section, key)
        if value is not None and not Path(config.resolve_path(value)).exists():
            raise ConfigError(f"{where}.{key}: {config.resolve_path(value)} does not exist")
    for task in section.lm_eval_tasks:
        if not Path(config.resolve_path(task)).is_file():
            raise ConfigError(f"{where}.lm_eval_tasks: {config.resolve_path(task)} is not a file")
    if section.json_schema is not None:
        _schema(config, section.json_schema, where)
    if section.verifier is not None:
        _verifier(section.verifier, where)
    if section.judge_prompt is not None:
        _judge_prompt(config, section.judge_prompt, where)
    specs = model_specs(config, where, after_training=False)
    names = [spec.name for spec in specs]
    if section.reference is not None and section.reference not in names:
        raise ConfigError(f"{where}.reference: {section.reference!r} is not one of the models {names}")
    if section.few_shot and _base_target(config, after_training=False) is None:
        raise ConfigError(
            f"{where}.few_shot: the few-shot row is the base model with examples, and there is no base "
            "(set eval.base to a model folder; a model built from model.from_config has none)"
        )
    if section.few_shot:
        names.append(f"{BASE_NAME}+{section.few_shot}shot")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: model names must be unique; {duplicates} appear twice in {names}")
    if section.judge is not None:
        _spec(config, section.judge, f"{where}.judge")


def model_specs(config: Any, where: str, after_training: bool) -> list:
    """The rows in order: the base (when there is one), the trained model, then `models`.

    Before training the trained model's folder does not exist yet, so its row is only named;
    after it, the row points at OUTPUT/model."""
    from exemplar.evaluate.evaluation import ModelSpec

    section = config.eval
    specs = []
    base = _base_target(config, after_training)
    if isinstance(base, ModelSpec):
        specs.append(base)
    elif base is not None:
        specs.append(_spec(config, f"{BASE_NAME}={base}", f"{where}.base"))
    trained = Path(config.output_dir) / "model"
    specs.append(
        ModelSpec.parse(f"{section.name}={trained}", f"{where}.name")
        if after_training
        else ModelSpec(section.name, path=str(trained))
    )
    for name, target in section.models.items():
        specs.append(_spec(config, f"{name}={target}", f"{where}.models.{name}"))
    return specs


def _base_target(config: Any, after_training: bool):
    """None (no base row), a folder or URL#served-name, or before training a model.path that is a
    Hub id (its row is named; the folder is the local Hub cache's copy once training loaded it)."""
    from exemplar.evaluate.evaluation import ModelSpec

    base = config.eval.base
    if base is False:
        return None
    if isinstance(base, str):
        return base
    if config.model is None or config.model.path is None:  # from_config: a random init, no folder
        return None
    folder = Path(config.resolve_path(config.model.path))
    if folder.is_dir():
        return str(folder)
    if not after_training:
        return ModelSpec(BASE_NAME, path=config.model.path)
    return _hub_cache_folder(config.model.path)


def _hub_cache_folder(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same: no local copy
        raise ConfigError(
            f"eval.base: model.path {repo_id!r} is neither a folder nor in the local Hub cache ({e}); "
            "set eval.base to the base model's folder, or eval.base: false"
        ) from None


def _spec(config: Any, text: str, where: str):
    from exemplar.evaluate.evaluation import ModelSpec

    name, sep, target = text.partition("=")
    if sep and target and not target.startswith(("http://", "https://")):
        text = f"{name}={config.resolve_path(target)}"
    return ModelSpec.parse(text, where)


def _schema(config: Any, path: str, where: str) -> dict[str, Any]:
    import jsonschema

    file = config.resolve_path(path)
    try:
        schema = json.loads(Path(file).read_text(encoding="utf-8"))
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}.json_schema: {file}: not JSON: {e}") from None
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{where}.json_schema: {file}: not a valid JSON schema: {e.message}") from None
    return schema


def _verifier(spec: str, where: str) -> None:
    from exemplar.evaluate.scoring import load_verifier

    try:
        load_verifier(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}.verifier: {e}") from None


def _judge_prompt(config: Any, path: str, where: str) -> None:
    from exemplar.evaluate.judge import load_judge_prompt

    try:
        load_judge_prompt(config.resolve_path(path))
    except ConfigError as e:
        raise ConfigError(f"{where}.judge_prompt: {e}") from None


def evaluation_options(config: Any):
    from exemplar.evaluate.evaluation import EvalOptions

    section = config.eval
    resolve = config.resolve_path
    return EvalOptions(
        max_new_tokens=section.max_new_tokens,
        temperature=section.temperature,
        top_p=section.top_p,
        seed=section.seed,
        batch_size=section.batch_size,
        regex=section.regex,
        json_schema=_schema(config, section.json_schema, "eval") if section.json_schema else None,
        verifier=section.verifier,
        few_shot=section.few_shot,
        shots=resolve(section.shots) if section.shots else None,
        general=resolve(section.general) if section.general else None,
        judge=_spec(config, section.judge, "eval.judge") if section.judge else None,
        judge_prompt=resolve(section.judge_prompt) if section.judge_prompt else None,
        reference=section.reference,
        lm_eval_tasks=[resolve(task) for task in section.lm_eval_tasks],
        lm_eval_limit=section.lm_eval_limit,
        config=config,
        device=section.device,
        bootstrap_seed=section.bootstrap_seed,
    )


def evaluate_after_training(config: Any) -> dict[str, Any]:
    """Run the section on the exported model; returns `evaluate_models`' result (with its table)."""
    from exemplar.evaluate.evaluation import evaluate_models

    specs = model_specs(config, "eval", after_training=True)
    out = Path(config.output_dir) / EVAL_DIR
    log.info("evaluating %s on %s (the config's eval: section)", ", ".join(s.name for s in specs), out)
    return evaluate_models(specs, config.resolve_path(config.eval.data), out, evaluation_options(config))


def evaluate_into_summary(config: Any, summary: dict[str, Any]) -> Exception | None:
    """At the end of `exemplar train` (rank 0): the section, when the config has one, into
    OUTPUT/eval/ and the run summary. A failure is returned, for the caller to raise once the
    summary and the report are written: the model is saved whatever the evaluation does."""
    if config.eval is None:
        return None
    try:
        result = evaluate_after_training(config)
    except Exception as e:  # noqa: BLE001 - any failure: raised after the run's records are written
        summary["eval_error"] = f"{type(e).__name__}: {e}"
        failed = EvaluationFailed(
            f"the eval: section failed after training ({type(e).__name__}: {e}); the model is saved in "
            f"{summary['outputs'].get('model')}, and `exemplar eval` can evaluate it"
        )
        failed.__cause__ = e
        return failed
    log.info("\n%s", result["table"])
    summary["eval"] = {"models": result["models"], "table": result["table"]}
    summary["outputs"]["eval"] = str(Path(config.output_dir) / EVAL_DIR / "eval.json")
    return None
