"""What a training run records for its report, beside the model: the resolved config, the data
statistics with a few mask previews, and the versions of the software that trained it.

`exemplar report RUN_DIR` renders the page from these files alone (no data, tokenizer or model
needed), so a report can be made again later, elsewhere, or for a run that was copied.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from exemplar.fsio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
DATA_STATS_FILE = "data_stats.json"
# The first line of the config.yaml a run writes: a file without it is the user's, never overwritten.
CONFIG_HEADER = "# The resolved config of this run, written by `exemplar train`."
PREVIEW_EXAMPLES = 3
PREVIEW_MAX_TOKENS = 400  # per example: enough to see the mask pattern, small enough to read
HISTOGRAM_BINS = 32
IGNORE_INDEX = -100
_PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "exemplar-sft")


def write_config(config: Any, output_dir: str | Path) -> Path | None:
    """OUTPUT/config.yaml: every option of the run, defaults filled in (the config holds no secrets;
    nothing from the environment is written). A config.yaml there that a run did not write (the
    user's own file, say) is left alone and None is returned."""
    path = Path(output_dir) / CONFIG_FILE
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").startswith(CONFIG_HEADER):
        log.warning("%s is not a config written by exemplar: leaving it as it is", path)
        return None
    data = config.model_dump(mode="json")
    header = CONFIG_HEADER + "\n"
    if config.base_dir:
        header += f"# Relative paths are relative to {config.base_dir} (the original config's folder).\n"
    return atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def versions() -> dict[str, str]:
    """Python, the main libraries, the platform, and CUDA when torch sees a GPU."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name.removesuffix("-sft")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.removesuffix("-sft")] = "not installed"
    torch = sys.modules.get("torch")  # only when loaded: a report alone should not import torch
    if torch is not None:
        out["cuda"] = torch.version.cuda or "none (CPU build)"
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def data_stats(prepared: Any, max_length: int) -> dict[str, Any]:
    """Token statistics of the prepared training set, drops by reason, and a few mask previews.

    Read with pyarrow in batches (lengths and label counts per batch), never as Python lists of
    every label: cheap next to training even for large sets.
    """
    from exemplar.data.inspect import histogram
    from exemplar.data.lengths import token_counts

    all_lengths, trained = token_counts(prepared.train)
    tokens = int(all_lengths.sum())
    dropped: Counter[str] = Counter()
    for report in prepared.reports:
        dropped.update(report.dropped)
        if report.invalid:
            dropped["invalid row (data.skip_invalid)"] += report.invalid
    return {
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.eval) if prepared.eval is not None else 0,
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": trained / tokens if tokens else 0.0,
        "max_length": max_length,
        "length": _length_summary(all_lengths),
        "length_histogram": histogram(all_lengths, max_length, bins=HISTOGRAM_BINS),
        "dropped": dict(sorted(dropped.items())),
        "sources": [_source_stats(r) for r in prepared.reports],
        "previews": mask_previews(prepared.train, prepared.tokenizer),
    }


def _source_stats(r: Any) -> dict[str, Any]:
    out = {"path": r.path, "rows": r.rows, "kept": r.kept, "dropped": dict(r.dropped), "invalid": r.invalid}
    out["formats"] = dict(r.formats)
    if r.turn_conversations:  # mask.reasoning: every_turn
        out["every_turn"] = {"examples": r.turn_examples, "conversations": r.turn_conversations}
    return out


def mask_previews(dataset: Any, tokenizer: Any, count: int = PREVIEW_EXAMPLES) -> list[dict[str, Any]]:
    """The first examples as token texts with a trained flag each (the report colours them)."""
    specials = set(tokenizer.all_special_ids)
    out = []
    for row in dataset.select(range(min(count, len(dataset)))):
        ids, labels = row["input_ids"], row["labels"]
        shown = ids[:PREVIEW_MAX_TOKENS]
        out.append(
            {
                "tokens": [_token_text(tokenizer, t) for t in shown],
                "trained": [label != IGNORE_INDEX for label in labels[: len(shown)]],
                "special": [t in specials for t in shown],
                "length": len(ids),
                "trained_tokens": sum(1 for label in labels if label != IGNORE_INDEX),
            }
        )
    return out


def write_data_stats(
    prepared: Any, max_length: int, output_dir: str | Path, curation: list[dict] | None = None
) -> Path:
    """OUTPUT/data_stats.json; `curation`: the statistics of the curation stages the data came from."""
    stats = data_stats(prepared, max_length)
    if curation:
        stats["curation"] = curation
    return atomic_write_json(Path(output_dir) / DATA_STATS_FILE, stats)


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _length_summary(lengths: Any) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    import numpy as np

    return {
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "p50": int(np.percentile(lengths, 50, method="lower")),
        "p95": int(np.percentile(lengths, 95, method="lower")),
        "max": int(lengths.max()),
    }
