"""The report's charts as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` and rendered by `FigureCanvasAgg` directly, not
through pyplot: no GUI backend is ever chosen (training machines have no display) and no global
figure state is left behind in a training process.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_SIZE = (6.4, 2.8)  # inches, at 100 dpi: 640 x 280 pixels
_DPI = 100


def step_chart(
    rows: list[dict[str, Any]],
    key: str,
    title: str,
    *,
    extra: tuple[list[dict[str, Any]], str, str] | None = None,
) -> bytes | None:
    """`key` against the step over `rows`; `extra` adds (rows, key, label) as a second series
    (the eval loss over the train loss). None when no row has a number for `key`."""
    points = _series(rows, key)
    extra_points = _series(extra[0], extra[1]) if extra else ([], [])
    if not points[0] and not extra_points[0]:
        return None
    fig, axes = _figure(title)
    if points[0]:
        axes.plot(*points, linewidth=1.2, label=key)
    if extra and extra_points[0]:
        axes.plot(*extra_points, marker="o", linewidth=1.2, label=extra[2])
    if extra:
        axes.legend(loc="best", fontsize=8)
    values = [v for v in points[1] + extra_points[1] if v > 0]
    if values and max(values) / min(values) > 1e3:  # a spike would flatten the rest of the curve
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return _png(fig)


def length_histogram(bins: list[dict[str, int]], title: str) -> bytes | None:
    """Bars of the token-length histogram (`exemplar.data.inspect.histogram`'s bins)."""
    if not bins:
        return None
    fig, axes = _figure(title)
    lefts = [b["from"] for b in bins]
    widths = [max(1, b["to"] - b["from"]) for b in bins]
    axes.bar(lefts, [b["count"] for b in bins], width=widths, align="edge", edgecolor="white")
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    return _png(fig)


def reasons_chart(counts: dict[str, int], title: str) -> bytes | None:
    """Horizontal bars, one per removal reason, the largest on top. None when nothing was removed."""
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda item: item[1])
    height = max(_SIZE[1], 0.9 + 0.3 * len(items))  # a bar per reason stays readable
    fig, axes = _figure(title, size=(_SIZE[0], height))
    axes.barh([label for label, _ in items], [count for _, count in items])
    axes.set_xlabel("rows removed")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def score_histogram(bins: list[dict[str, Any]], title: str) -> bytes | None:
    """Stacked bars of kept and removed rows per score bin (`exemplar.curate.stats.score_histogram`)."""
    if not bins:
        return None
    fig, axes = _figure(title)
    lefts = [b["from"] for b in bins]
    widths = [(b["to"] - b["from"]) or 1.0 for b in bins]
    kept = [b["kept"] for b in bins]
    axes.bar(lefts, kept, width=widths, align="edge", edgecolor="white", label="kept")
    removed = [b["removed"] for b in bins]
    if any(removed):
        axes.bar(lefts, removed, bottom=kept, width=widths, align="edge", edgecolor="white", label="removed")
        axes.legend(loc="best", fontsize=8)
    axes.set_xlabel("score")
    axes.set_ylabel("rows")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _figure(title: str, size: tuple[float, float] = _SIZE):
    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.tick_params(labelsize=8)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
