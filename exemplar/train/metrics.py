"""What a run reports: a progress bar, OUTPUT/metrics.jsonl, TensorBoard (when installed), and the summary.

metrics.jsonl holds one JSON object per optimizer step (step, epoch, loss, lr, grad_norm, tokens,
trained_tokens, tokens_per_s, elapsed_s) and one per evaluation (step, eval_loss,
eval_perplexity, eval_token_accuracy). External checks rely on these key names.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from exemplar.fsio import atomic_write_text

log = logging.getLogger(__name__)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows of steps <= `last_step` (on resume, so rows after the checkpoint are not doubled)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS), and GPU peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class MetricsLogger:
    """Writes step and eval rows to metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = _tensorboard(output_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)
        # In a log file (no terminal) every refresh is a new line: refresh every 30 s there instead.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not progress,
            mininterval=0.1 if interactive else 30.0,
        )

    def log_step(self, row: dict[str, Any], write: bool = True) -> None:
        """Every step moves the bar; rows are written on logging steps (`log_every`)."""
        self.bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            lr=f"{row['lr']:.2e}",
            tok_s=f"{row['tokens_per_s']:.0f}",
            refresh=False,
        )
        self.bar.update(1)
        if not write:
            return
        self._write(row)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if isinstance(row.get(key), (int, float)):
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def log_eval(self, row: dict[str, Any]) -> None:
        self._write(row)
        self.bar.write(
            f"step {row['step']}: eval_loss {row['eval_loss']:.4f}  "
            f"perplexity {row['eval_perplexity']:.2f}  token_accuracy {row['eval_token_accuracy']:.4f}"
        )
        if self.tb is not None:
            for key, value in row.items():
                if key.startswith("eval_") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"eval/{key[5:]}", value, row["step"])

    def _write(self, row: dict[str, Any]) -> None:
        # One flushed line per row: a killed run leaves at most one partial line (dropped on resume).
        self.file.write(json.dumps(row, allow_nan=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(path: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional (the `tensorboard` extra)
        return None
    return SummaryWriter(str(path), purge_step=purge_step)
