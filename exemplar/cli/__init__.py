"""The `exemplar` command: a thin layer over the library API.

Every user mistake (bad config, bad row, missing file) is an `ExemplarError` and is printed as
one clear message with exit status 2, never as a Python traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from exemplar import __version__
from exemplar.cli import data_commands
from exemplar.errors import ExemplarError
from exemplar.train.run_guard import TrainingInterrupted

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exemplar", description="Supervised fine-tuning of causal LMs.")
    parser.add_argument("--version", action="version", version=f"exemplar {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data_commands.register(commands)
    for module in _optional_command_modules():
        module.register(commands)
    return parser


def _optional_command_modules() -> list:
    """Command groups of the other stages, registered when their package is present."""
    import importlib

    modules = []
    commands = (
        "exemplar.cli.train_commands",
        "exemplar.cli.model_commands",
        "exemplar.cli.eval_commands",
        "exemplar.cli.curate_commands",
        "exemplar.cli.report_commands",
    )
    for name in commands:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return modules


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "huggingface_hub", "datasets", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        return int(args.handler(args) or 0)
    except TrainingInterrupted as e:  # a checkpoint was written: say how to go on, exit 128 + signal
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ExemplarError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `exemplar data preview ... | head`
        return 0
