"""What a finished curation stage did: removal reasons and score histograms.

Read from a stage folder (curate/io.py: summary.json, kept.jsonl, removed.jsonl), or from its
kept.jsonl: the reasons as summary.json counts them, checked against the `meta.reason` of every
row of removed.jsonl (a difference is reported, never hidden), and a histogram of each
`meta.scores.NAME` (the scores `curate score` writes) over the kept and the removed rows, on
shared bins. `exemplar data stats` prints it; `exemplar report` draws it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from exemplar.curate.io import KEPT, REMOVED, SUMMARY, read_stage
from exemplar.errors import DataError

SCORE_BINS = 10


def stage_folder(path: str | Path) -> Path | None:
    """The stage folder that `path` is (or whose output file it is), or None for anything else.

    A folder is a stage folder when it holds summary.json with the stage keys, and kept.jsonl or
    removed.jsonl; a file is a stage's when it is one of those two files in such a folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name not in (KEPT, REMOVED):
        return None
    if not (folder / KEPT).is_file() and not (folder / REMOVED).is_file():
        return None
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and {"in", "kept", "removed"} <= set(summary):
        return folder
    return None


def curation_stats(path: str | Path) -> dict[str, Any]:
    """The stage's counts, removal reasons and score histograms (see the module docstring)."""
    folder = stage_folder(path)
    if folder is None:
        near = Path(path) if Path(path).is_dir() else Path(path).parent
        if (near / KEPT).is_file() or (near / REMOVED).is_file():
            read_stage(near)  # no summary.json: says the stage did not finish
        raise DataError(f"{path}: not a curation stage folder (no {SUMMARY} beside {KEPT} / {REMOVED})")
    summary = read_stage(folder)
    scores: dict[str, dict[str, list[float]]] = {}
    problems: list[str] = []
    reasons: Counter[str] = Counter()
    removed_by: Counter[str] = Counter()
    for name, kept in ((KEPT, True), (REMOVED, False)):
        for line_no, meta in _metas(folder / name, problems):
            _collect_scores(meta, "kept" if kept else "removed", scores, f"{name}, line {line_no}", problems)
            if not kept:
                reasons[str(meta.get("reason", "(no meta.reason)"))] += 1
                removed_by[str(meta.get("removed_by", "(no meta.removed_by)"))] += 1
    counted = {str(k): int(v) for k, v in (summary.get("removed") or {}).items()}
    if counted != dict(reasons):
        problems.append(
            f"{SUMMARY} counts removals {counted}, but the rows of {REMOVED} give {dict(sorted(reasons.items()))}"
        )
    return {
        "folder": str(folder),
        "stage": summary.get("stage"),
        "in": summary.get("in"),
        "kept": summary.get("kept"),
        "removed": dict(sorted(counted.items(), key=lambda item: (-item[1], item[0]))),
        "removed_total": sum(counted.values()),
        "removed_by": dict(sorted(removed_by.items())),
        "scores": {name: score_histogram(values) for name, values in sorted(scores.items())},
        "problems": problems,
    }


def _metas(file: Path, problems: list[str]):
    """(1-based line, meta) of each record of a stage file; unreadable lines are counted as problems."""
    if not file.is_file():
        return
    with file.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                problems.append(f"{file.name}, line {line_no}: not JSON ({e})")
                continue
            meta = record.get("meta") if isinstance(record, dict) else None
            yield line_no, meta if isinstance(meta, dict) else {}


def _collect_scores(meta: dict, side: str, scores: dict, where: str, problems: list[str]) -> None:
    for name, value in (meta.get("scores") or {}).items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{where}: meta.scores.{name} is not a finite number ({value!r})")
            continue
        scores.setdefault(name, {"kept": [], "removed": []})[side].append(float(value))


def score_histogram(values: dict[str, list[float]], bins: int = SCORE_BINS) -> dict[str, Any]:
    """Counts of kept and removed rows per bin, equal-width bins from the lowest score to the highest."""
    every = values["kept"] + values["removed"]
    low, high = min(every), max(every)
    width = (high - low) / bins if high > low else 0.0
    count = bins if width else 1

    def bin_of(v: float) -> int:
        return min(int((v - low) / width), bins - 1) if width else 0

    kept, removed = Counter(map(bin_of, values["kept"])), Counter(map(bin_of, values["removed"]))
    return {
        "rows": len(every),
        "kept": len(values["kept"]),
        "removed": len(values["removed"]),
        "min": low,
        "mean": sum(every) / len(every),
        "max": high,
        "bins": [
            {
                "from": low + b * width,
                "to": low + (b + 1) * width if width else high,
                "kept": kept.get(b, 0),
                "removed": removed.get(b, 0),
            }
            for b in range(count)
        ],
    }


def format_curation_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"curation stage   {stats['stage']}  ({stats['folder']})",
        f"rows in          {stats['in']}",
        f"kept             {stats['kept']}",
        f"removed          {stats['removed_total']}",
    ]
    lines.append("removal reasons" if stats["removed"] else "removal reasons: none removed")
    lines += _bars([(reason, count) for reason, count in stats["removed"].items()])
    for name, score in stats["scores"].items():
        lines.append(
            f"score {name}: {score['rows']} rows ({score['kept']} kept, {score['removed']} removed)  "
            f"min {score['min']:.4g}  mean {score['mean']:.4g}  max {score['max']:.4g}"
        )
        lines.append(f"  {'from':>10} {'to':>10} {'kept':>7} {'removed':>7}  (█ kept, ░ removed)")
        peak = max((b["kept"] + b["removed"] for b in score["bins"]), default=0) or 1
        for b in score["bins"]:
            bar = "█" * round(30 * b["kept"] / peak) + "░" * round(30 * b["removed"] / peak)
            lines.append(f"  {b['from']:>10.4g} {b['to']:>10.4g} {b['kept']:>7} {b['removed']:>7} {bar}")
    if not stats["scores"]:
        lines.append("scores: none (no meta.scores in the rows; `exemplar curate score` adds them)")
    lines += [f"warning: {problem}" for problem in stats["problems"]]
    return "\n".join(lines)


def _bars(rows: list[tuple[str, int]]) -> list[str]:
    width = max((len(label) for label, _ in rows), default=0)
    peak = max((count for _, count in rows), default=0) or 1
    return [f"  {label:<{width}} {count:>7} {'█' * round(40 * count / peak)}" for label, count in rows]


def run_curation_stats(path: str | Path, as_json: bool = False) -> int:
    """`exemplar data stats STAGE_DIR` (or STAGE_DIR/kept.jsonl): print the stage's statistics."""
    stats = curation_stats(path)
    print(json.dumps(stats, indent=2) if as_json else format_curation_stats(stats))
    return 0
