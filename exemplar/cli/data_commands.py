"""`exemplar data preview | validate | stats | convert`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    from exemplar.cli import add_config_arguments

    data = commands.add_parser("data", help="inspect and check training data")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)

    preview = verbs.add_parser("preview", help="show each example's tokens, trained ones highlighted")
    add_config_arguments(preview)
    preview.add_argument("--limit", type=int, default=5, help="rows to show (default 5; 0 for all)")
    preview.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per example on stdout: index, format, input_ids, labels (or "dropped")',
    )
    preview.add_argument("--no-color", action="store_true", help="plain text: trained spans in [[ ]]")
    preview.set_defaults(handler=run_preview)

    validate = verbs.add_parser("validate", help="check every row of every dataset")
    add_config_arguments(validate)
    validate.set_defaults(handler=run_validate)

    stats = verbs.add_parser(
        "stats",
        help="rows, token lengths, trained share, drops; given a curation stage folder (or its "
        "kept.jsonl): its removal reasons and score histograms",
    )
    add_config_arguments(stats)
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.set_defaults(handler=run_stats)

    convert = verbs.add_parser("convert", help="write the datasets as conversation records (JSONL)")
    add_config_arguments(convert)
    convert.add_argument("--out", required=True, metavar="FILE.jsonl", help="the record file to write")
    convert.add_argument(
        "--split", choices=("train", "eval"), default="train", help="which datasets (default: train)"
    )
    convert.set_defaults(handler=run_convert)


def _config(args: argparse.Namespace):
    from exemplar.config import load_config
    from exemplar.errors import ConfigError

    config = load_config(args.config, args.overrides)
    if not config.data.train:
        raise ConfigError(f"{args.config}: no datasets under data.train")
    return config


def run_preview(args: argparse.Namespace) -> int:
    from exemplar.data.inspect import preview_items, preview_json, render_preview, use_colour
    from exemplar.data.tokenizer import load_tokenizer

    config = _config(args)
    bundle = load_tokenizer(config)
    colour = not args.no_color and use_colour(sys.stdout)
    for item in preview_items(config, limit=args.limit or None, bundle=bundle):
        if args.json:
            print(preview_json(item))
        else:
            print(render_preview(item, bundle.tokenizer, colour))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from exemplar.data.formats import describe_format
    from exemplar.data.inspect import validate

    result = validate(_config(args))
    for problem in result.problems:
        print(problem, file=sys.stderr)
    for file, fmt in result.formats.items():
        print(f"{file}: format {describe_format(fmt)}")
    status = "ok" if result.ok else f"{len(result.problems)} invalid"
    print(f"{result.rows} rows in {len(result.files)} file(s) checked: {status}")
    return 0 if result.ok else 1


def run_stats(args: argparse.Namespace) -> int:
    from exemplar.curate.stats import run_curation_stats, stage_folder
    from exemplar.data.inspect import compute_stats, format_stats

    if Path(args.config).is_dir() or stage_folder(args.config):  # a curation stage, not a config
        return run_curation_stats(args.config, args.json)
    stats = compute_stats(_config(args), progress=not args.json)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from exemplar.data.convert import convert

    result = convert(_config(args), args.out, args.split)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    invalid = f", {len(result.problems)} invalid rows not written" if result.problems else ""
    print(f"{result.rows} rows read, {result.written} records written to {result.path}{invalid}")
    return 0 if result.ok else 1
