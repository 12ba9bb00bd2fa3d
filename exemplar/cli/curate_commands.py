"""`exemplar curate dedup | filter | mix` (score, select, run, distill, best-of-k, iterate: sibling modules): each writes --out DIR (kept.jsonl, removed.jsonl, summary.json)."""

from __future__ import annotations

import argparse
import sys

from exemplar.cli import curate_gen_commands


def register(commands: argparse._SubParsersAction) -> None:
    curate = commands.add_parser("curate", help="deduplicate, filter and mix data (the curate extra)")
    verbs = curate.add_subparsers(dest="curate_command", metavar="VERB", required=True)

    dedup = verbs.add_parser("dedup", help="remove exact, near (MinHash) or semantic duplicates")
    _common(dedup, many=True)
    dedup.add_argument("--method", choices=("exact", "minhash", "semantic"), default="exact")
    dedup.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="minhash: Jaccard (default 0.8); semantic: cosine (0.95)",
    )
    dedup.add_argument(
        "--on", choices=("prompt", "response", "both"), default="both", help="what is compared"
    )
    dedup.add_argument("--model", default=None, help="semantic: a local sentence-transformers model folder")
    dedup.set_defaults(handler=run_dedup)

    filt = verbs.add_parser("filter", help="remove rows by rules (empty, length, repetition, refusal, ...)")
    _common(filt, many=True)
    filt.add_argument("--tokenizer", default=None, help="for the token length rules (default: the config's)")
    filt.add_argument(
        "--min-score",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="remove rows whose meta.scores.NAME is below VALUE (repeatable)",
    )
    filt.set_defaults(handler=run_filter)

    mix = verbs.add_parser("mix", help="mix datasets by ratio into one file")
    mix.add_argument(
        "inputs", nargs="+", metavar="PATH:WEIGHT", help="a dataset and its ratio, e.g. a.jsonl:1"
    )
    mix.add_argument("--out", required=True, metavar="DIR")
    mix.add_argument(
        "--total",
        type=int,
        default=None,
        help="rows to write (default: the ratio with the scarcest source used fully)",
    )
    mix.add_argument("--seed", type=int, default=0)
    mix.add_argument("--config", default=None)
    mix.add_argument("--no-progress", action="store_true")
    mix.set_defaults(handler=run_mix)
    # The other verbs live in their own modules (they import this module's helpers, hence the late import).
    from exemplar.cli import curate_score_commands, curate_select_commands

    curate_score_commands.register(verbs)  # score
    curate_select_commands.register(verbs)  # select, run
    curate_gen_commands.register(verbs)  # distill, best-of-k, iterate


def _common(parser: argparse.ArgumentParser, many: bool) -> None:
    parser.add_argument("inputs", nargs="*", metavar="IN", help="data files in any supported format")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument(
        "--config", default=None, help="a config: its data.train (without IN) and curate: options"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set curate.filter.languages=[en]",
    )
    parser.add_argument(
        "--num-proc", type=int, default=None, help="worker processes (default: min(cores, 8))"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace):
    from exemplar.config import load_config

    return load_config(args.config, getattr(args, "overrides", []))


def _workers(args: argparse.Namespace) -> int:
    from exemplar.curate.parallel import default_workers

    return args.num_proc or default_workers()


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _report(out, summary: dict) -> int:
    removed = ", ".join(f"{k} {v}" for k, v in summary["removed"].items()) or "none"
    print(f"{summary['in']} rows in, {summary['kept']} kept, removed: {removed}; written to {out}")
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from exemplar.curate.dedup import dedup
    from exemplar.curate.io import StageWriter, read_inputs

    config = _config(args)
    options = {"method": args.method, "threshold": args.threshold, "on": args.on}
    records = read_inputs(args.inputs, config)
    with StageWriter(args.out, "dedup", options) as writer:
        dedup(
            records,
            writer,
            args.method,
            args.threshold,
            args.on,
            _workers(args),
            args.model,
            progress=not args.no_progress,
            log=_log,
        )
    clusters = writer.extra["clusters"]
    _log(f"{clusters['count']} clusters of duplicates ({clusters['rows']} rows); the largest in summary.json")
    return _report(args.out, writer.summary())


def run_filter(args: argparse.Namespace) -> int:
    from exemplar.curate.filters import filter_records
    from exemplar.curate.io import StageWriter, read_inputs
    from exemplar.errors import ConfigError

    config = _config(args)
    min_scores = {}
    for item in args.min_score:
        name, sep, value = item.partition("=")
        try:
            min_scores[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"--min-score expects NAME=NUMBER, got {item!r}")
    tokenizer = args.tokenizer or _config_tokenizer(config)
    if tokenizer is None:
        _log(
            "note: no tokenizer (--tokenizer or a config's tokenizer/model.path): token length rules skipped"
        )
    options = {**config.curate.filter.model_dump(), "min_scores": min_scores, "tokenizer": tokenizer}
    records = read_inputs(args.inputs, config)
    with StageWriter(args.out, "filter", options) as writer:
        filter_records(records, writer, config, min_scores, tokenizer, _workers(args), not args.no_progress)
    return _report(args.out, writer.summary())


def _config_tokenizer(config) -> str | None:
    from exemplar.errors import ConfigError

    try:
        return config.tokenizer_source()
    except ConfigError:
        return None


def run_mix(args: argparse.Namespace) -> int:
    from exemplar.curate.io import StageWriter
    from exemplar.curate.mix import mix, parse_part
    from exemplar.errors import ConfigError

    if args.total is not None and args.total < 1:
        raise ConfigError("--total must be at least 1")
    config = _config(args) if args.config else None
    parts = [parse_part(text) for text in args.inputs]
    options = {"parts": [[p.path, p.weight] for p in parts], "total": args.total, "seed": args.seed}
    with StageWriter(args.out, "mix", options) as writer:
        mix(parts, writer, args.total, args.seed, config, not args.no_progress, _log)
    for s in writer.extra["sources"]:
        _log(f"{s['path']}: {s['taken']} of {s['rows']} rows (weight {s['weight']:g})")
    return _report(args.out, writer.summary())
