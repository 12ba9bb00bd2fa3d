"""`exemplar curate score IN... --out DIR --scorer SPEC [...]`: add meta.scores.NAME to every row."""

from __future__ import annotations

import argparse

from exemplar.cli.curate_commands import _common, _config, _log, _report


def register(verbs: argparse._SubParsersAction) -> None:
    score = verbs.add_parser("score", help="score rows (reward model, LLM judge, IFD, perplexity, ...)")
    _common(score, many=True)
    score.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="SPEC",
        help="[NAME=]verifier:module:function | reward:PATH | judge:PATH-or-URL#served-name | ifd:PATH "
        "| perplexity:PATH | relevance[:PATH] (repeatable; NAME is the meta.scores key)",
    )
    score.add_argument(
        "--rubric", default=None, metavar="FILE", help="judge: the rubric (curate.score.rubric)"
    )
    score.add_argument("--batch-size", type=int, default=32, help="records scored at a time")
    score.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from exemplar.curate.io import StageWriter, read_inputs
    from exemplar.curate.scorers import make_scorer, score_records

    config = _config(args)
    if args.rubric:
        config.curate.score.rubric = args.rubric
    scorers = [make_scorer(spec, config) for spec in args.scorer]
    options = {"scorers": args.scorer, **config.curate.score.model_dump()}
    try:
        with StageWriter(args.out, "score", options) as writer:
            score_records(
                read_inputs(args.inputs, config),
                writer,
                scorers,
                batch_size=args.batch_size,
                progress=not args.no_progress,
            )
    finally:
        for scorer in scorers:
            getattr(scorer, "close", lambda: None)()
    for name, count in writer.extra["score_errors"].items():
        if count:
            _log(f"{name}: {count} rows could not be scored (removed as score_error; see removed.jsonl)")
    return _report(args.out, writer.summary())
