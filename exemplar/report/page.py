"""The report page: one self-contained HTML file, charts inline as base64 PNG data URIs.

No scripts and no external resources (no CDN, no fonts, no links to load): the file opens the
same offline, attached to an email, or years later. Every piece of text from the run (data
tokens, config values, file names) goes through `html.escape`, because data may contain markup.
"""

from __future__ import annotations

import base64
import datetime
import math
from html import escape
from itertools import groupby
from typing import Any

from exemplar.report import plots
from exemplar.report.run_folder import RunFolder

EVAL_COLUMNS = (
    "nll",
    "perplexity",
    "token_accuracy",
    "exact_match",
    "stop_rate",
    "mean_length",
    "general_nll",
)
# train_summary.json keys shown, with what they mean (the run's numbers, not the data set's).
SUMMARY_KEYS = {
    "steps": "optimizer steps",
    "total_steps": "steps planned",
    "epochs": "epochs",
    "examples": "training examples",
    "tokens": "tokens seen (all steps)",
    "trained_tokens": "tokens trained (all steps)",
    "final_loss": "final loss",
    "eval_loss": "last eval loss",
    "best_eval_loss": "best eval loss",
    "best_step": "best eval step",
    "train_wall_s": "training time (s, loop only)",
    "tokens_per_s": "tokens per second",
    "peak_rss_mb": "peak memory (MiB)",
    "peak_gpu_mem_mb": "peak GPU memory (MiB)",
    "skipped_steps": "skipped steps",
    "nonfinite_steps": "non-finite steps",
    "world_size": "processes",
    "distributed": "distribution",
    "packing": "packing",
    "fill_ratio": "packing fill ratio",
    "resumed_from": "resumed from",
}

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .8em; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.wide { overflow-x: auto; }
img { display: block; max-width: 100%; margin: .5em 0; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
.missing { color: #8a5a00; background: #fff6e0; padding: .4em .8em; }
.tokens { white-space: pre-wrap; font: 12px/1.6 ui-monospace, monospace; background: #f6f6f6; padding: .8em; }
.t { background: #c8f0c8; } .m { color: #777; } .s { font-weight: bold; color: #a0309a; }
"""


def render(run: RunFolder, versions_now: dict[str, str]) -> str:
    """The page for `run`; `versions_now` (this environment) stands in when the run recorded none."""
    title = f"Training report: {run.path.name or run.path}"
    body = [
        *heading(title, "Run folder", str(run.path)),
        *_problems(run),
        _section("summary", "Summary", _summary(run)),
        _section("training", "Training curves", _curves(run)),
        _section("data", "Data", _data(run)),
        _section("mask-preview", "Mask preview", _previews(run)),
        _section("evaluation", "Evaluation", _evaluation(run)),
        _section("config", "Config", _config(run)),
        _section("versions", "Versions", _versions(run, versions_now)),
    ]
    return document(title, body)


def heading(title: str, label: str, folder: str) -> list[str]:
    """The page's title, and the folder it is about with the time it was made."""
    made = datetime.datetime.now().isoformat(timespec="seconds")
    return [
        f"<h1>{escape(title)}</h1>",
        f"<p>{escape(label)} <code>{escape(folder)}</code> · report made {escape(made)}</p>",
    ]


def document(title: str, body: list[str]) -> str:
    """The whole page: head (title, style) and the body parts."""
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _section(anchor: str, heading: str, content: list[str]) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(heading)}</h2>\n' + "\n".join(content) + "\n</section>"


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _problems(run: RunFolder) -> list[str]:
    notes = list(run.problems)
    if run.unreadable_lines:
        notes.append(
            f"{run.unreadable_lines} line(s) of metrics.jsonl are not metrics rows and are left out "
            "(a line cut short when a run was killed)"
        )
    return [_missing(note) for note in notes]


# ---------------------------------------------------------------------------------------------
# sections


def _summary(run: RunFolder) -> list[str]:
    if run.summary is None:
        return [_missing("No train_summary.json: the run has not finished, or stopped before the end.")]
    rows = [(label, run.summary[key]) for key, label in SUMMARY_KEYS.items() if key in run.summary]
    out = [_table(["", "value"], rows)]
    outputs = run.summary.get("outputs") or {}
    if outputs:
        out.append("<p>Outputs:</p>" + _table(["", "path"], sorted(outputs.items())))
    return out


def _curves(run: RunFolder) -> list[str]:
    if not run.steps and not run.evals:
        return [_missing("No metrics rows in metrics.jsonl: the run logged no step yet.")]
    charts = [
        plots.step_chart(run.steps, "loss", "Loss", extra=(run.evals, "eval_loss", "eval_loss")),
        plots.step_chart(run.steps, "lr", "Learning rate"),
        plots.step_chart(run.steps, "grad_norm", "Gradient norm (before clipping)"),
        plots.step_chart(run.steps, "tokens_per_s", "Tokens per second"),
    ]
    alts = ["loss curve (train and eval)", "learning rate", "gradient norm", "tokens per second"]
    out = [_image(png, alt) for png, alt in zip(charts, alts, strict=True) if png is not None]
    if not run.evals:
        out.insert(
            1, "<p>No evaluation during training (set train.eval_every and eval data to have one).</p>"
        )
    return out


def _data(run: RunFolder) -> list[str]:
    stats = run.data_stats
    if stats is None:
        out = [_missing("No data_stats.json in the run folder: no token-length histogram or trained share.")]
        lines = [line for source in (run.summary or {}).get("data", []) for line in source]
        if lines:
            out.append("<p>The run's data report:</p><pre>" + escape("\n".join(lines)) + "</pre>")
        return out
    rows: list[tuple[str, Any]] = [
        ("train examples (weights applied)", stats.get("train_examples")),
        ("eval examples", stats.get("eval_examples")),
        ("tokens", stats.get("tokens")),
        ("trained tokens", stats.get("trained_tokens")),
        ("trained share", _percent(stats.get("trained_share"))),
    ]
    rows += [(f"length {k}", v) for k, v in (stats.get("length") or {}).items()]
    out = [_table(["", "value"], rows)]
    png = plots.length_histogram(stats.get("length_histogram") or [], "Token length of the training examples")
    if png is not None:
        out.append(_image(png, "token-length histogram"))
    dropped = stats.get("dropped") or {}
    out.append("<h3>Dropped examples</h3>")
    out.append(_table(["reason", "examples"], sorted(dropped.items())) if dropped else "<p>None dropped.</p>")
    for stage in stats.get("curation") or []:  # the training data came from a curation stage
        from exemplar.report.curation_page import curation_parts

        out.append(
            f"<h3>Curation: {escape(str(stage.get('stage')))} stage in {escape(str(stage.get('folder')))}</h3>"
        )
        out += curation_parts(stage)
    sources = stats.get("sources") or []
    if sources:
        out.append("<h3>Sources</h3>")
        out.append(
            _table(
                ["file", "rows", "kept", "dropped", "invalid"],
                [
                    (
                        s.get("path"),
                        s.get("rows"),
                        s.get("kept"),
                        sum((s.get("dropped") or {}).values()),
                        s.get("invalid"),
                    )
                    for s in sources
                ],
            )
        )
    return out


def _previews(run: RunFolder) -> list[str]:
    previews = (run.data_stats or {}).get("previews")
    if not previews:
        return [_missing("No mask preview: data_stats.json is missing or holds no examples.")]
    out = [
        '<p>Trained tokens are <span class="t">highlighted</span>, masked ones <span class="m">grey</span>, '
        'special tokens <span class="s">bold</span>.</p>'
    ]
    for number, example in enumerate(previews):
        tokens, trained = example.get("tokens") or [], example.get("trained") or []
        special = example.get("special") or [False] * len(tokens)
        length = example.get("length", len(tokens))
        head = f"Example {number}: {length} tokens, {example.get('trained_tokens', sum(trained))} trained"
        if length > len(tokens):
            head += f" (the first {len(tokens)} shown)"
        out.append(
            f"<h3>{escape(head)}</h3>\n<div class=tokens>{_token_spans(tokens, trained, special)}</div>"
        )
    return out


def _token_spans(tokens: list[str], trained: list[bool], special: list[bool]) -> str:
    """Runs of tokens with the same flags as one span each: class t (trained) or m (masked), plus s
    (special). A hand-edited file with lists of unequal length shows the common part."""
    spans = []
    flagged = zip(tokens, trained, special, strict=False)
    for (is_trained, is_special), group in groupby(flagged, key=lambda t: (t[1], t[2])):
        classes = ("t" if is_trained else "m") + (" s" if is_special else "")
        spans.append(f'<span class="{classes}">{escape("".join(t[0] for t in group))}</span>')
    return "".join(spans)


def _evaluation(run: RunFolder) -> list[str]:
    if run.evaluation is None:
        return [
            _missing(
                "No evaluation: no eval.json or eval/eval.json in the run folder (`exemplar eval` writes one)."
            )
        ]
    models = run.evaluation.get("models")
    if not isinstance(models, dict) or not models:
        return [_missing(f"{run.evaluation_path.name} holds no `models` table.")]
    columns = [c for c in EVAL_COLUMNS if any(isinstance(m, dict) and c in m for m in models.values())]
    others = {k for m in models.values() if isinstance(m, dict) for k, v in m.items() if _is_number(v)}
    columns += sorted(others - set(columns))
    intervals = run.evaluation.get("intervals")
    intervals = intervals if isinstance(intervals, dict) else {}
    rows = []
    for name, metrics in models.items():
        metrics = metrics if isinstance(metrics, dict) else {}
        spans = intervals.get(name) if isinstance(intervals.get(name), dict) else {}
        rows.append((name, *(_with_interval(metrics.get(c), spans.get(c)) for c in columns)))
    rel = run.evaluation_path.relative_to(run.path)
    note = f"From <code>{escape(str(rel))}</code>; a dash is a metric that model has no value for"
    if _is_number(run.evaluation.get("confidence")) and intervals:
        note += f"; in brackets the {run.evaluation['confidence']:.0%} bootstrap interval"
    return [f"<p>{note}.</p>", f'<div class="wide">{_table(["model", *columns], rows)}</div>']


def _with_interval(value: Any, span: Any) -> Any:
    """The value, and its interval [low, high] after it when eval.json has one."""
    if not _is_number(value) or not (
        isinstance(span, list) and len(span) == 2 and all(map(_is_number, span))
    ):
        return value
    return _Numeric(f"{_number(value)} [{_number(span[0])}, {_number(span[1])}]")


class _Numeric(str):
    """Text that is a number (with its interval): right-aligned like one."""


def _config(run: RunFolder) -> list[str]:
    if run.config_text is None:
        return [_missing("No config.yaml in the run folder.")]
    return [f"<pre>{escape(run.config_text)}</pre>"]


def _versions(run: RunFolder, versions_now: dict[str, str]) -> list[str]:
    recorded = (run.summary or {}).get("versions")
    if isinstance(recorded, dict) and recorded:
        return ["<p>Of the environment that trained the run.</p>", _table(["", "version"], recorded.items())]
    note = "The run recorded no versions: these are of the environment that made this report."
    return [_missing(note), _table(["", "version"], versions_now.items())]


# ---------------------------------------------------------------------------------------------
# pieces


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: list[str], rows) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, _Numeric):
        return f'<td class="n">{escape(value)}</td>'
    if _is_number(value):
        return f'<td class="n">{escape(_number(value))}</td>'
    return f"<td>{escape('–' if value is None else str(value))}</td>"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"


def _percent(value: Any) -> str:
    return f"{value:.1%}" if _is_number(value) else "–"
