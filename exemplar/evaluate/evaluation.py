"""`exemplar eval`: several models on the same held-out conversations, with intervals.

For each model (a local folder, or `NAME=URL#served-name` for an OpenAI-compatible server):

- likelihood (local folders): response NLL per trained token, perplexity and token accuracy,
  over the token rows the training pipeline builds (`prepare_data`), so the masks are training's;
- generation: each held-out prompt answered, then the checks of `exemplar.evaluate.scoring`, the
  stop rate, the mean length (tokens) and the share cut at the length limit;
- `few_shot` K: one more row, the first model (the base) with K worked examples in its prompt;
- `general`: NLL on general text (every token), and its change against the base;
- `judge`: the pairwise win rate against a reference model or the held-out references.

Every metric comes with a seeded bootstrap 95% interval, and every model's difference from the
base with the paired interval (`exemplar.evaluate.bootstrap`). Written to OUT/eval.json
(`models` -> NAME -> metric values; `intervals`, `differences`), OUT/eval_examples.jsonl (one row
per model and example) and OUT/eval.md (the table, also returned and printed by the command).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exemplar.errors import ConfigError, DataError
from exemplar.evaluate import bootstrap, scoring
from exemplar.evaluate.generator import GenerationRequest, GenerationResult, Generator
from exemplar.fsio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# name -> (kind, higher is better); ratio metrics are sums over tokens, the rest means over examples
METRICS: dict[str, str] = {
    "nll": "ratio",
    "token_accuracy": "ratio",
    "exact_match": "mean",
    "normalized_match": "mean",
    "contains": "mean",
    "regex_match": "mean",
    "json_valid": "mean",
    "json_schema_valid": "mean",
    "verifier": "mean",
    "stop_rate": "mean",
    "truncated_rate": "mean",
    "mean_length": "mean",
    "general_nll": "ratio",
    "win_rate": "mean",
}


@dataclass(frozen=True)
class ModelSpec:
    """`NAME=PATH` (a model folder) or `NAME=URL#served-name` (an OpenAI-compatible server)."""

    name: str
    path: str | None = None
    url: str | None = None
    served: str | None = None

    @classmethod
    def parse(cls, text: str, flag: str = "--model") -> ModelSpec:
        name, sep, target = text.partition("=")
        if not sep or not name or not target:
            raise ConfigError(f"{flag} must be NAME=PATH or NAME=URL#served-name, got {text!r}")
        if target.startswith(("http://", "https://")):
            url, hash_, served = target.partition("#")
            if not hash_ or not served:
                raise ConfigError(
                    f"{flag} {text!r}: a server needs its model name after '#' (URL#served-name)"
                )
            return cls(name, url=url, served=served)
        if not Path(target).is_dir():
            raise ConfigError(f"{flag} {text!r}: {target} is not a model folder")
        return cls(name, path=target)

    @property
    def local(self) -> bool:
        return self.path is not None


@dataclass
class EvalOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    micro_batch_size: int = 8
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    verifier: str | None = None
    few_shot: int = 0
    shots: str | None = None
    general: str | None = None
    judge: ModelSpec | None = None
    judge_prompt: str | None = None
    reference: str | None = None  # a model's name; None: the held-out references
    lm_eval_tasks: list[str] = field(default_factory=list)  # harness task YAML files (the eval extra)
    lm_eval_limit: int | None = None
    config: Any = None  # a training Config: its mask, max_length, truncation and template apply
    device: str | None = None
    confidence: float = 0.95
    resamples: int = bootstrap.RESAMPLES
    bootstrap_seed: int = 0


@dataclass
class ModelRun:
    """One row of the table: per-example values of every metric it has (None: not available)."""

    name: str
    values: dict[str, list[float | None]] = field(default_factory=dict)
    weights: dict[str, list[float | None]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Data


def read_heldout(path: str | Path, config: Any = None) -> list[dict[str, Any]]:
    """Held-out conversations (any supported format) as records; each must end with an assistant
    message, its reference answer."""
    from exemplar.config import load_config
    from exemplar.data.records import to_record
    from exemplar.data.schema import Conversation
    from exemplar.data.sources import read_conversations

    records = []
    reading = load_config(None, data={"train": [{"path": str(Path(path).resolve())}]})
    for i, example in enumerate(read_conversations(reading)):
        where = f"{path}, row {(example.meta or {}).get('source', {}).get('row', i + 1)}"
        if not isinstance(example, Conversation):
            raise DataError(f"{where}: held-out rows must be conversations, got {type(example).__name__}")
        record = to_record(example)
        if record["messages"][-1]["role"] != "assistant" or len(record["messages"]) < 2:
            raise DataError(f"{where}: messages: the last message must be the assistant's reference answer")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no held-out conversations")
    return records


def _prompt_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "train"} for m in record["messages"][:-1]]


def reference_of(record: dict[str, Any]) -> str:
    return record["messages"][-1].get("content") or ""


def question_of(record: dict[str, Any]) -> str:
    """What the judge is shown as the question: the last user message, or the whole exchange
    before the answer when there are several turns."""
    turns = [m for m in _prompt_messages(record) if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0].get("content") or ""
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in turns)


def with_shots(record: dict[str, Any], shots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The record with the shots' exchanges before its own (after its system message); the shot
    turns are marked untrained, so its NLL is still over the record's own trained tokens only."""
    messages = record["messages"]
    system = [m for m in messages[:1] if m["role"] == "system"]
    shot_turns = [{**m, "train": False} for s in shots for m in s["messages"] if m["role"] != "system"]
    return {**record, "messages": [*system, *shot_turns, *messages[len(system) :]]}


def pick_shots(k: int, n_rows: int, pool: Sequence[dict[str, Any]], same_as_data: bool) -> list[list[int]]:
    """For each row, the indices of its k shots: the first k of the pool, skipping the row itself
    when the pool is the held-out data (a row is never its own example)."""
    need = k + 1 if same_as_data else k
    if len(pool) < need:
        raise ConfigError(f"--few-shot {k} needs at least {need} shot rows, the shots have {len(pool)}")
    return [[j for j in range(need) if not (same_as_data and j == i)][:k] for i in range(n_rows)]


def _token_rows(
    records: list[dict] | None,
    path: str | None,
    tokenizer: Any,
    options: EvalOptions,
    text: bool,
    limit: int,
    shots: bool = False,
):
    """(row index -> (input_ids, labels)) from the training pipeline, and how many were dropped.

    Few-shot rows may be longer than the config's max_length (the shots lengthen the prompt, not
    the answer that is scored): they get the model's context instead, when that is longer."""
    from exemplar.config import load_config
    from exemplar.data.pipeline import prepare_data

    base = options.config
    max_length = base.max_length if base else limit
    mapping: dict[str, Any] = {
        "data": {"train": [{"path": str(Path(path).resolve())}] if path else [], "num_proc": 1},
        "max_length": max(max_length, limit) if shots else max_length,
        # general text is scored on its first max_length tokens rather than dropped
        "truncation": "truncate" if text else (base.truncation if base else "drop"),
    }
    if base is not None:
        # one scored example per held-out row: every_turn would make several of one row
        mapping["mask"] = {**base.mask.model_dump(), "reasoning": "as_rendered"}
        mapping["special_tokens"] = list(base.special_tokens)
    config = load_config(None, **mapping)
    data = prepare_data(
        config,
        use_cache=False,
        progress=False,
        train_data=records,
        data_format="messages" if records is not None else None,
        tokenizer=tokenizer,
    )
    ds = data.train
    rows = {
        int(r): (ids, labels) for r, ids, labels in zip(ds["row"], ds["input_ids"], ds["labels"], strict=True)
    }
    total = sum(report.rows for report in data.reports)
    return rows, total - len(rows)


# ---------------------------------------------------------------------------------------------
# One model


def _generator(spec: ModelSpec, options: EvalOptions, out: Path) -> Generator:
    from exemplar.evaluate.http_generator import HttpGenerator
    from exemplar.evaluate.local import LocalGenerator

    if spec.local:
        return LocalGenerator.from_folder(spec.path, device=options.device, batch_size=options.batch_size)
    return HttpGenerator(spec.url, spec.served, cache_dir=out / "http_cache" / spec.name)


def _likelihood(
    run: ModelRun, generator: Any, records, options: EvalOptions, key: str, path=None, shots: bool = False
) -> None:
    from exemplar.evaluate.heldout import response_nll

    positions = getattr(generator.model.config, "max_position_embeddings", None) or 2048
    rows, dropped = _token_rows(
        records, path, generator.tokenizer, options, path is not None, min(2048, positions), shots
    )
    n = len(records) if records is not None else dropped + len(rows)
    order = sorted(rows)
    scores = dict(
        zip(
            order,
            response_nll(
                generator.model, generator.tokenizer, [rows[i] for i in order], options.micro_batch_size
            ),
            strict=True,
        )
    )
    run.counts[f"{key}_dropped"] = dropped
    run.values[key] = [scores[i].loss_sum if i in scores else None for i in range(n)]
    run.weights[key] = [scores[i].tokens if i in scores else None for i in range(n)]
    if key == "nll":
        run.values["token_accuracy"] = [scores[i].correct if i in scores else None for i in range(n)]
        run.weights["token_accuracy"] = run.weights["nll"]
        for i, example in enumerate(run.examples):
            if i in scores:
                example.update(
                    nll_sum=scores[i].loss_sum,
                    trained_tokens=scores[i].tokens,
                    correct_tokens=scores[i].correct,
                )


def _generate(
    run: ModelRun, generator: Generator, records, references, options: EvalOptions
) -> list[str | None]:
    requests = [
        GenerationRequest(
            _prompt_messages(r),
            tools=r.get("tools"),
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
        )
        for r in records
    ]
    results: list[GenerationResult] = []
    step = max(1, generator.preferred_batch)
    for start in range(0, len(requests), step):
        results.extend(generator.generate(requests[start : start + step]))
    responses = [res.text if res.ok else None for res in results]
    run.counts["generation_errors"] = sum(r is None for r in responses)
    ok = [i for i, r in enumerate(responses) if r is not None]
    texts = [responses[i] for i in ok]
    refs = [references[i] for i in ok]

    def spread(values: Sequence[float | None]) -> list[float | None]:
        full: list[float | None] = [None] * len(records)
        for i, v in zip(ok, values, strict=True):
            full[i] = v
        return full

    checks = {
        "exact_match": scoring.exact_match(texts, refs),
        "normalized_match": scoring.normalized_match(texts, refs),
        "contains": scoring.contains(texts, refs),
    }
    if options.regex:
        checks["regex_match"] = scoring.regex_match(texts, options.regex)
    checks["json_valid"] = scoring.json_valid(texts)
    if options.json_schema is not None:
        checks["json_schema_valid"] = scoring.json_schema_valid(texts, options.json_schema)
    if options.verifier:
        checks["verifier"] = scoring.verified(
            [records[i] for i in ok], texts, scoring.load_verifier(options.verifier)
        )
    samples = [results[i].samples[0] for i in ok]
    checks["stop_rate"] = [float(s.stopped) for s in samples]
    checks["truncated_rate"] = [float(s.finish_reason == "length") for s in samples]
    checks["mean_length"] = [float(s.tokens) if s.tokens is not None else None for s in samples]
    for name, values in checks.items():
        run.values[name] = spread(values)
    for i, (example, result) in enumerate(zip(run.examples, results, strict=True)):
        example["response"] = responses[i]
        if result.ok:
            example.update(
                stopped=result.samples[0].stopped,
                finish_reason=result.samples[0].finish_reason,
                response_tokens=result.samples[0].tokens,
            )
        else:
            example["error"] = result.error
        for name in checks:
            example[name] = run.values[name][i]
    return responses


def _new_run(name: str, records: list[dict], references: list[str]) -> ModelRun:
    examples = [
        {"model": name, "index": i, "source": (r.get("meta") or {}).get("source"), "reference": references[i]}
        for i, r in enumerate(records)
    ]
    return ModelRun(name, examples=examples)


def _release(generator: Generator) -> None:
    generator.close()
    del generator
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


# ---------------------------------------------------------------------------------------------
# The run


def evaluate_models(
    models: Sequence[str | ModelSpec],
    data: str | Path,
    out: str | Path,
    options: EvalOptions | None = None,
    **option_values: Any,
) -> dict[str, Any]:
    """Evaluate `models` (the first is the base) on the held-out file `data`; write and return the
    results (see the module docstring). Options are an `EvalOptions` or its fields as keywords."""
    options = options or EvalOptions(**option_values)
    specs = [m if isinstance(m, ModelSpec) else ModelSpec.parse(m) for m in models]
    if not specs:
        raise ConfigError("give at least one --model")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {names}")
    if options.reference is not None and options.reference not in names:
        raise ConfigError(f"--reference {options.reference!r} is not one of the models {names}")
    if options.few_shot < 0:
        raise ConfigError("--few-shot must be >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = read_heldout(data)
    references = [reference_of(r) for r in records]
    shot_records = records if options.shots is None else read_heldout(options.shots)
    runs: list[ModelRun] = []
    for index, spec in enumerate(specs):
        generator = _generator(spec, options, out)
        try:
            run = _new_run(spec.name, records, references)
            run.counts["examples"] = len(records)
            if spec.local:
                _likelihood(run, generator, records, options, "nll")
                if options.general:
                    _likelihood(run, generator, None, options, "general_nll", path=options.general)
            _generate(run, generator, records, references, options)
            runs.append(run)
            if index == 0 and options.few_shot:
                picks = pick_shots(options.few_shot, len(records), shot_records, options.shots is None)
                shot_rows = [
                    with_shots(r, [shot_records[j] for j in p]) for r, p in zip(records, picks, strict=True)
                ]
                fs = _new_run(f"{spec.name}+{options.few_shot}shot", records, references)
                fs.counts["examples"] = len(records)
                if spec.local:
                    _likelihood(fs, generator, shot_rows, options, "nll", shots=True)
                _generate(fs, generator, shot_rows, references, options)
                runs.append(fs)
        finally:
            _release(generator)
    if options.judge is not None:
        _judge(runs, records, references, options, out)
    result = summarize(runs, options)
    for spec in specs:
        if spec.local and options.lm_eval_tasks:
            result["models"][spec.name]["lm_eval"] = _lm_eval(spec, options)
    result["data"] = str(data)
    _write(out, result, runs)
    return result


def _lm_eval(spec: ModelSpec, options: EvalOptions) -> dict[str, dict[str, Any]]:
    from exemplar.evaluate.lm_eval_bridge import run_lm_eval, task_name

    return {
        task_name(task): run_lm_eval(
            spec.path, task, device=options.device, batch_size=options.batch_size, limit=options.lm_eval_limit
        )
        for task in options.lm_eval_tasks
    }


def _judge(runs: list[ModelRun], records, references, options: EvalOptions, out: Path) -> None:
    from exemplar.evaluate.judge import judge_pairs, load_judge_prompt

    template = load_judge_prompt(options.judge_prompt)
    questions = [question_of(r) for r in records]
    by_name = {run.name: run for run in runs}
    opponent = (
        [e.get("response") for e in by_name[options.reference].examples]
        if options.reference
        else list(references)
    )
    generator = _generator(options.judge, options, out)
    try:
        for run in runs:
            if run.name == options.reference:
                continue
            mine = [e.get("response") for e in run.examples]
            both = [i for i in range(len(records)) if mine[i] is not None and opponent[i] is not None]
            outcome = judge_pairs(
                generator,
                template,
                [questions[i] for i in both],
                [mine[i] for i in both],
                [opponent[i] for i in both],
            )
            run.values["win_rate"] = [None] * len(records)
            for i, score, replies in zip(both, outcome.scores, outcome.replies, strict=True):
                run.values["win_rate"][i] = score
                run.examples[i].update(win_rate=score, judge=replies)
            run.counts["judge_asked"], run.counts["judge_errors"] = outcome.asked, outcome.errors
    finally:
        _release(generator)


# ---------------------------------------------------------------------------------------------
# Numbers and tables


def _present(run: ModelRun, name: str, indices: Sequence[int] | None = None):
    values = run.values[name]
    weights = run.weights.get(name) or [1.0] * len(values)
    keep = [i for i in (indices if indices is not None else range(len(values))) if values[i] is not None]
    return keep, [values[i] for i in keep], [weights[i] for i in keep]


def summarize(runs: list[ModelRun], options: EvalOptions) -> dict[str, Any]:
    kw = dict(confidence=options.confidence, resamples=options.resamples, seed=options.bootstrap_seed)
    models: dict[str, dict[str, Any]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        row: dict[str, Any] = dict(run.counts)
        spans: dict[str, list[float]] = {}
        for name in METRICS:
            if name not in run.values:
                continue
            _, values, weights = _present(run, name)
            if not values or sum(weights) <= 0:
                row[name] = None
                continue
            interval = bootstrap.bootstrap_interval(values, weights, **kw)
            row[name], spans[name] = interval.value, interval.as_list()
            if name == "nll":
                row["perplexity"] = _exp(interval.value)
                spans["perplexity"] = [_exp(interval.low), _exp(interval.high)]
        models[run.name], intervals[run.name] = row, spans
    base = runs[0]
    differences: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs[1:]:
        differences[run.name] = {}
        for name in METRICS:
            if name not in run.values or name not in base.values:
                continue
            diff = _paired(run, base, name, kw)
            if diff is not None:
                differences[run.name][name] = diff
    for run in runs:
        if "general_nll" in models[run.name] and "general_nll" in models[base.name]:
            change = differences.get(run.name, {}).get("general_nll")
            models[run.name]["general_nll_change"] = change["value"] if change else 0.0
    return {
        "models": models,
        "intervals": intervals,
        "differences": differences,
        "base": base.name,
        "reference": options.reference or "references",
        "confidence": options.confidence,
        "bootstrap": {"resamples": options.resamples, "seed": options.bootstrap_seed},
        "settings": {
            "max_new_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "seed": options.seed,
            "few_shot": options.few_shot,
            "regex": options.regex,
            "verifier": options.verifier,
            "general": options.general,
        },
    }


def _paired(run: ModelRun, base: ModelRun, name: str, kw: dict) -> dict[str, float] | None:
    both = [
        i
        for i in range(len(run.values[name]))
        if run.values[name][i] is not None and base.values[name][i] is not None
    ]
    if not both:
        return None
    _, va, wa = _present(run, name, both)
    _, vb, wb = _present(base, name, both)
    if sum(wa) <= 0 or sum(wb) <= 0:
        return None
    diff = bootstrap.paired_difference(va, vb, wa, wb, **kw)
    return {
        "value": diff.value,
        "low": diff.low,
        "high": diff.high,
        "against": base.name,
        "examples": len(both),
    }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


COLUMNS = [
    "nll",
    "perplexity",
    "token_accuracy",
    "exact_match",
    "normalized_match",
    "contains",
    "regex_match",
    "json_valid",
    "json_schema_valid",
    "verifier",
    "stop_rate",
    "truncated_rate",
    "mean_length",
    "general_nll",
    "general_nll_change",
    "win_rate",
]


def markdown_table(result: dict[str, Any]) -> str:
    models, intervals, diffs = result["models"], result["intervals"], result["differences"]
    shown = [c for c in COLUMNS if any(m.get(c) is not None for m in models.values())]
    lines = ["| model | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, row in models.items():
        cells = []
        for column in shown:
            value = row.get(column)
            span = intervals[name].get(column)
            if column == "general_nll_change" and value is not None and name in diffs:
                d = diffs[name].get("general_nll")
                span = [d["low"], d["high"]] if d else None
            cells.append(_cell(value, span))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    level = int(round(result["confidence"] * 100))
    lines.append("")
    lines.append(
        f"Brackets: bootstrap {level}% intervals over examples (seed {result['bootstrap']['seed']})."
    )
    for name, row in models.items():
        for task, metrics in (row.get("lm_eval") or {}).items():
            shown_metrics = ", ".join(
                f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k
            )
            lines.append(f"- {name} on lm-eval task {task}: {shown_metrics}")
    for name, metrics in diffs.items():
        parts = [
            f"{m} {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            for m, d in metrics.items()
            if m in ("nll", "exact_match", "stop_rate", "general_nll", "win_rate")
        ]
        if parts:
            lines.append(f"- {name} - {result['base']} (paired): " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _cell(value: Any, span: list[float] | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"
    if span:
        text += (
            f" [{span[0]:.3f}, {span[1]:.3f}]"
            if max(map(abs, span)) < 1000
            else f" [{span[0]:.3g}, {span[1]:.3g}]"
        )
    return text


def _write(out: Path, result: dict[str, Any], runs: list[ModelRun]) -> None:
    from exemplar.data.records import dumps

    table = markdown_table(result)
    result["table"] = table
    atomic_write_json(out / "eval.json", result)
    atomic_write_text(out / "eval_examples.jsonl", "".join(dumps(e) for run in runs for e in run.examples))
    atomic_write_text(out / "eval.md", table)
