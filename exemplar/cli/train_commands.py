"""`exemplar train` and `exemplar quickstart`."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    from exemplar.cli import add_config_arguments

    train = commands.add_parser("train", help="fine-tune a model as the config says")
    add_config_arguments(train)
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    train.set_defaults(handler=run_train)

    quick = commands.add_parser(
        "quickstart", help="an offline demo that fine-tunes a small model and shows it learn"
    )
    quick.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    quick.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the tuned demo length)"
    )
    quick.set_defaults(handler=run_quickstart)


def run_train(args: argparse.Namespace) -> int:
    from exemplar.config import load_config
    from exemplar.train.finetune import finetune

    summary = finetune(load_config(args.config, args.overrides), resume=args.resume)
    keys = ("steps", "tokens", "trained_tokens", "train_wall_s", "tokens_per_s", "final_loss", "peak_rss_mb")
    print(json.dumps({k: summary.get(k) for k in keys} | {"outputs": summary.get("outputs")}, indent=2))
    return 0


def run_quickstart(args: argparse.Namespace) -> int:
    from exemplar.quickstart import run_quickstart as quickstart

    quickstart(args.out, steps=args.steps)
    return 0
