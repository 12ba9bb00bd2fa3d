"""A bridge to lm-evaluation-harness (the `eval` extra): standard or user-written tasks on a
local model folder, through `lm_eval.simple_evaluate` with the harness's own `hf` model.

A task is a harness task YAML file; its folder is added to the harness's task search path, so a
user's own task over a local JSON file (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`)
runs offline. The harness scores prompts as it formats them (no chat template unless the task
says so), so its numbers answer "how does the model do on this benchmark", not the held-out
questions of `exemplar eval`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from exemplar.errors import ConfigError

_TASK_NAME = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def task_name(task_yaml: str | Path) -> str:
    """The `task:` name of a harness task file (read as text: task files use custom YAML tags)."""
    path = Path(task_yaml)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--lm-eval-task {path}: {e}") from None
    found = _TASK_NAME.search(text)
    if not found:
        raise ConfigError(f"--lm-eval-task {path}: no top-level 'task: NAME' line")
    return found.group(1)


def run_lm_eval(
    model_dir: str | Path,
    task_yaml: str | Path,
    *,
    device: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    """The harness's metrics for one task on one model folder: {"metric,filter": value, ...}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            'lm-evaluation-harness is not installed: pip install "exemplar-sft[eval]"'
        ) from None
    name = task_name(task_yaml)
    manager = TaskManager(include_path=str(Path(task_yaml).resolve().parent))
    if name not in manager.all_tasks:
        raise ConfigError(f"--lm-eval-task {task_yaml}: the harness did not load a task named {name!r}")
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir)},
        tasks=[name],
        task_manager=manager,
        device=device or "cpu",
        batch_size=batch_size,
        limit=limit,
    )
    metrics = dict(output["results"][name])
    metrics.pop("alias", None)
    metrics["samples"] = output.get("n-samples", {}).get(name, {}).get("effective")
    return metrics
