"""`exemplar curate iterate`: the rejection-sampling loop, round after round.

Each round r, in OUT/round-r/ (OUT = `curate.iterate.out`, else `output_dir`):

1. data/: `curate best-of-k` on `curate.iterate.prompts` with the current model (a local
   folder): K sampled responses per prompt, scored by `curate.iterate.scorer`, the passing best
   kept (kept.jsonl, removed.jsonl, failed.jsonl, summary.json with pass@1 and pass@K);
2. train/: `exemplar.finetune` of the config on data/kept.jsonl, starting from the current model
   (`train_from: current`) or from `model.path` every round (`base`); the model is train/model;
3. eval/: `exemplar.evaluate_models` of the current model and the new one on
   `curate.iterate.heldout` (eval.json, eval.md);
4. round.json, written last: the round's numbers; the new model is the next round's current one.

Resume: a rerun skips every round that has its round.json, and within the first unfinished one
reuses each finished step (a data folder with its summary.json, a train folder with its
train_summary.json, an eval folder with its eval.json); an interrupted fine-tune resumes from its
latest checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exemplar.config import Config, DatasetSpec
from exemplar.curate.io import SUMMARY
from exemplar.errors import ConfigError, ExemplarError
from exemplar.fsio import atomic_write_json

ROUND_FILE = "round.json"
ROUND_SEED_STRIDE = 1_000_000


def iterate(
    config: Config, rounds: int, *, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or finish) `rounds` rounds; returns {"rounds": [round.json of each], "table": lines}."""
    settings = config.curate.iterate
    _check(config, rounds)
    out = Path(config.resolve_path(settings.out) if settings.out else config.output_dir)
    current = config.resolve_path(config.model.path)
    done = []
    for r in range(1, rounds + 1):
        folder = out / f"round-{r}"
        if (folder / ROUND_FILE).is_file():
            result = json.loads((folder / ROUND_FILE).read_text(encoding="utf-8"))
            log(f"round {r}: finished earlier ({folder / ROUND_FILE})")
        else:
            result = _round(config, r, current, folder, progress, log)
            atomic_write_json(folder / ROUND_FILE, result)
        done.append(result)
        current = result["model_out"]
    return {"rounds": done, "table": table(done)}


def _check(config: Config, rounds: int) -> None:
    settings = config.curate.iterate
    if rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    missing = [name for name in ("prompts", "heldout", "scorer") if not getattr(settings, name)]
    if missing:
        raise ConfigError(f"curate.iterate needs {', '.join('curate.iterate.' + m for m in missing)}")
    if config.model is None or not config.model.path:
        raise ConfigError("curate iterate samples with model.path (a model folder): set model.path")
    if not Path(config.resolve_path(config.model.path)).is_dir():
        raise ConfigError(f"model.path {config.model.path!r} is not a local model folder")


def _round(
    config: Config, r: int, current: str, folder: Path, progress: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    data = _sample(config, r, current, folder / "data", progress)
    log(
        f"round {r}: pass@1 {data['pass_rate']['at_1']:.3f}, pass@{data['pass_rate']['k']} "
        f"{data['pass_rate']['at_k']:.3f}; {data['kept']} responses kept for training"
    )
    start = (
        current if config.curate.iterate.train_from == "current" else config.resolve_path(config.model.path)
    )
    model_out = _train(config, start, folder / "data" / "kept.jsonl", folder / "train", progress)
    evaluation = _evaluate(config, r, current, model_out, folder / "eval")
    log(f"round {r}: model {model_out}; evaluation in {folder / 'eval' / 'eval.md'}")
    return {
        "round": r,
        "model_in": current,
        "trained_from": start,
        "model_out": model_out,
        "data": {
            k: data[k] for k in ("in", "kept", "kept_prompts", "removed", "failed", "pass_rate", "scores")
        },
        "eval": evaluation,
    }


def _sample(config: Config, r: int, model: str, out: Path, progress: bool) -> dict[str, Any]:
    from exemplar.curate.best_of_k import BestOfK, best_of_k
    from exemplar.curate.generation_stage import GenerationWriter, Sampling
    from exemplar.curate.io import read_inputs
    from exemplar.evaluate.local import LocalGenerator

    settings = config.curate.iterate
    plan = BestOfK(settings.k, settings.keep, settings.min_score)
    sampling = Sampling(
        settings.max_new_tokens,
        settings.temperature,
        settings.top_p,
        settings.seed + (r - 1) * ROUND_SEED_STRIDE,
    )
    options = {"model": model, "scorer": settings.scorer, **plan.to_dict(), **sampling.to_dict()}
    if (out / SUMMARY).is_file():
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
        if summary.get("options") == options:
            return summary
    scorer = plan.scorer(settings.scorer, config)
    records = read_inputs([config.resolve_path(settings.prompts)])
    with (
        LocalGenerator.from_folder(model, batch_size=settings.batch_size) as generator,
        GenerationWriter(out, "best-of-k", options) as writer,
    ):
        best_of_k(records, writer, generator, scorer, plan, sampling=sampling, model=model, progress=progress)
    summary = writer.summary()
    if summary["failed"]:
        raise ExemplarError(
            f"round {r}: {summary['failed']} prompts could not be answered ({out / 'failed.jsonl'})"
        )
    return summary


def _train(config: Config, start: str, data: Path, out: Path, progress: bool) -> str:
    from exemplar.train.finetune import finetune

    if (out / "train_summary.json").is_file():
        return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))["outputs"]["model"]
    if not data.read_text(encoding="utf-8").strip():
        raise ExemplarError(f"{data}: no response passed, so there is nothing to train on in this round")
    train = config.train.model_copy(update={"merge": True})  # the next round samples from a full folder
    round_config = config.model_copy(
        update={
            "model": config.model.model_copy(update={"path": start, "from_config": None}),
            "data": config.data.model_copy(update={"train": [DatasetSpec(path=str(data))], "eval": None}),
            "train": train,
            "output_dir": str(out),
        }
    )
    summary = finetune(round_config, resume=True, progress=progress)
    return summary["outputs"]["model"]


def _evaluate(config: Config, r: int, before: str, after: str, out: Path) -> dict[str, Any]:
    from exemplar.evaluate.evaluation import EvalOptions, ModelSpec, evaluate_models

    if (out / "eval.json").is_file():
        result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    else:
        settings = config.curate.iterate
        options = EvalOptions(
            max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, config=config
        )
        specs = [
            ModelSpec(f"round-{r - 1}" if r > 1 else "start", path=before),
            ModelSpec(f"round-{r}", path=after),
        ]
        result = evaluate_models(specs, config.resolve_path(settings.heldout), out, options)
    return {
        name: {k: row.get(k) for k in ("exact_match", "normalized_match", "nll", "stop_rate")}
        for name, row in result["models"].items()
    }


def table(rounds: list[dict[str, Any]]) -> list[str]:
    """A Markdown table: one line per round, pass rates of its sampling and held-out exact match."""
    lines = [
        "| round | pass@1 | pass@K | kept | exact match before | exact match after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in rounds:
        rates = result["data"]["pass_rate"]
        before, after = (row.get("exact_match") for row in result["eval"].values())
        lines.append(
            f"| {result['round']} | {rates['at_1']:.3f} | {rates['at_k']:.3f} (K={rates['k']}) | "
            f"{result['data']['kept']} | {_number(before)} | {_number(after)} |"
        )
    return lines


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
