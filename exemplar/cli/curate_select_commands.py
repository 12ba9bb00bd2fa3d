"""`exemplar curate select` and `exemplar curate run CONFIG` (registered by curate_commands)."""

from __future__ import annotations

import argparse

from exemplar.cli.curate_commands import _common, _config, _log, _report, _workers


def register(verbs: argparse._SubParsersAction) -> None:
    select = verbs.add_parser(
        "select", help="keep N rows with diverse prompts (optionally best-scored first)"
    )
    _common(select, many=True)
    select.add_argument("--n", type=int, required=True, help="rows to keep")
    select.add_argument("--by", choices=("diversity", "score", "score+diversity"), default="diversity")
    select.add_argument("--score", default=None, metavar="NAME", help="the meta.scores NAME ranked by")
    select.add_argument(
        "--method",
        choices=("k-center", "clusters"),
        default="k-center",
        help="k-center: greedy k-center (with a score: the Deita recipe); clusters: balanced over k-means",
    )
    select.add_argument(
        "--clusters", type=int, default=None, help="k-means k (default min(n, sqrt(rows), 100))"
    )
    select.add_argument(
        "--min-distance",
        type=float,
        default=0.1,
        help="score+diversity: a row is kept when its cosine distance to every kept row is above this",
    )
    select.add_argument(
        "--on", choices=("prompt", "response", "both"), default="prompt", help="what is embedded"
    )
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--model", default=None, help="a local sentence-transformers model folder")
    select.set_defaults(handler=run_select)

    run = verbs.add_parser("run", help="run the config's curate.stages in order, resuming where it stopped")
    run.add_argument("config", help="the YAML config with a curate: stages list")
    run.add_argument(
        "inputs", nargs="*", metavar="IN", help="data files for the first stage (default: data.train)"
    )
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument(
        "--from", dest="rerun_from", type=int, default=None, metavar="K", help="rerun from stage K (1-based)"
    )
    run.add_argument("--num-proc", type=int, default=None, help="worker processes (default: min(cores, 8))")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=run_stages)


def run_select(args: argparse.Namespace) -> int:
    from exemplar.config import SelectOptions, parse_options
    from exemplar.curate.io import StageWriter, read_inputs
    from exemplar.curate.select import select

    config = _config(args)
    options = parse_options(
        SelectOptions,
        "curate select",
        n=args.n,
        by=args.by,
        score=args.score,
        method=args.method,
        on=args.on,
        clusters=args.clusters,
        min_distance=args.min_distance,
        seed=args.seed,
        model=args.model,
    )
    with StageWriter(args.out, "select", options.model_dump(mode="json")) as writer:
        select(lambda: read_inputs(args.inputs, config), writer, options, not args.no_progress, _log)
    clusters = writer.extra["clusters"]
    _log(
        f"the selection covers {clusters['covered']} of {clusters['nonempty']} k-means clusters (summary.json)"
    )
    return _report(args.out, writer.summary())


def run_stages(args: argparse.Namespace) -> int:
    from exemplar.curate.run import run

    config = _config(args)
    final = run(
        config,
        args.inputs,
        workers=args.num_proc or config.data.num_proc or _workers(args),
        progress=not args.no_progress,
        rerun_from=args.rerun_from,
        log=_log,
    )
    print(final)
    return 0
