"""The report of a curation stage: counts, the removal-reasons chart and one histogram per score.

`exemplar report STAGE_DIR` writes it as a page of its own; a training run whose data came from a
stage's kept.jsonl shows the same parts in its Data section (data_stats.json keeps them). The
numbers are `exemplar.curate.stats.curation_stats`'s; the page follows page.py's rules (no
scripts, images inline, every text escaped).
"""

from __future__ import annotations

from typing import Any

from exemplar.report import plots
from exemplar.report.page import _image, _missing, _section, _table, document, heading


def curation_parts(stats: dict[str, Any]) -> list[str]:
    """HTML pieces for one stage: counts, removal reasons (chart and table), score histograms."""
    out = [
        _table(
            ["", "rows"],
            [("in", stats.get("in")), ("kept", stats.get("kept")), ("removed", stats.get("removed_total"))],
        )
    ]
    out += [_missing(problem) for problem in stats.get("problems") or []]
    removed = stats.get("removed") or {}
    if removed:
        png = plots.reasons_chart(removed, "Rows removed, by reason")
        out.append(_image(png, "removal reasons"))
        out.append(_table(["reason", "rows removed"], removed.items()))
    else:
        out.append("<p>No row removed.</p>")
    scores = stats.get("scores") or {}
    if scores:
        out.append(
            _table(
                ["score", "rows", "kept", "removed", "min", "mean", "max"],
                [
                    (f"meta.scores.{name}", s["rows"], s["kept"], s["removed"], s["min"], s["mean"], s["max"])
                    for name, s in scores.items()
                ],
            )
        )
    for name, score in scores.items():
        title = f"meta.scores.{name}: {score['rows']} rows, mean {score['mean']:.4g}"
        out.append(_image(plots.score_histogram(score["bins"], title), f"histogram of score {name}"))
    if not scores:
        out.append("<p>No scores in the rows (<code>exemplar curate score</code> adds meta.scores).</p>")
    return out


def render_curation(stats: dict[str, Any], versions_now: dict[str, str]) -> str:
    title = f"Curation report: {stats.get('stage') or 'stage'} ({stats['folder']})"
    body = [
        *heading(title, "Stage folder", stats["folder"]),
        _section("curation", "Curation", curation_parts(stats)),
        _section("versions", "Versions", [_table(["", "version"], versions_now.items())]),
    ]
    return document(title, body)
