"""A training run's folder as the report reads it: every part optional except the run itself.

A run folder is what `exemplar train` writes to `output_dir`: metrics.jsonl (one row per logged
step and per evaluation), train_summary.json (at the end), config.yaml, data_stats.json, model/,
and possibly an evaluation (eval.json, or eval/eval.json, from `exemplar eval`). A run still in
progress, or one stopped early, has only some of them; the report shows what is there and says
what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exemplar.errors import ExemplarError
from exemplar.report.run_record import CONFIG_FILE, DATA_STATS_FILE

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
REPORT_FILE = "report.html"
EVAL_FILES = ("eval.json", "eval/eval.json")


class NotARunFolder(ExemplarError):
    """The folder given to `exemplar report` is not the output folder of a training run."""


@dataclass
class RunFolder:
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)  # metrics rows of training steps
    evals: list[dict[str, Any]] = field(default_factory=list)  # metrics rows of evaluations
    unreadable_lines: int = 0  # metrics lines that are not JSON objects (a run killed mid-write)
    summary: dict[str, Any] | None = None
    config_text: str | None = None
    data_stats: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    evaluation_path: Path | None = None
    problems: list[str] = field(default_factory=list)  # files present but unreadable


def read_run_folder(path: str | Path) -> RunFolder:
    """Everything the report shows, read from the folder; raises NotARunFolder for any other folder."""
    path = Path(path)
    if not path.is_dir():
        raise NotARunFolder(f"{path}: no such folder")
    if not (path / METRICS_FILE).is_file() and not (path / SUMMARY_FILE).is_file():
        raise NotARunFolder(
            f"{path}: not a training run folder (it has neither {METRICS_FILE} nor {SUMMARY_FILE}); "
            "give the output_dir of an `exemplar train` run, or a curation stage folder"
        )
    run = RunFolder(path)
    _read_metrics(run)
    run.summary = _read_json(run, SUMMARY_FILE)
    run.data_stats = _read_json(run, DATA_STATS_FILE)
    if (path / CONFIG_FILE).is_file():
        run.config_text = (path / CONFIG_FILE).read_text(encoding="utf-8", errors="replace")
    for name in EVAL_FILES:
        if (path / name).is_file():
            run.evaluation, run.evaluation_path = _read_json(run, name), path / name
            break
    return run


def _read_metrics(run: RunFolder) -> None:
    file = run.path / METRICS_FILE
    if not file.is_file():
        return
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            run.unreadable_lines += 1
        elif "eval_loss" in row:
            run.evals.append(row)
        else:
            run.steps.append(row)


def _read_json(run: RunFolder, name: str) -> dict[str, Any] | None:
    file = run.path / name
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        run.problems.append(f"{name} could not be read: {e}")
        return None
    if not isinstance(data, dict):
        run.problems.append(f"{name} does not hold a JSON object")
        return None
    return data
