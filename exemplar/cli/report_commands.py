"""`exemplar report RUN_DIR`: the training report of a run folder, as one HTML file."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report",
        help="write RUN_DIR/report.html: curves, data statistics, mask preview, eval, config",
        description="Write the training report of a run folder (the output_dir of `exemplar train`): one "
        "self-contained HTML file with the loss curve, learning rate, gradient norm, tokens/s, the data "
        "statistics, a mask preview, the evaluation table (if any), the config and the versions. Given a curation "
        "stage folder (kept.jsonl, removed.jsonl, summary.json), its removal reasons and score histograms.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's output folder, or a curation stage folder"
    )
    parser.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from exemplar.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0
