"""`exemplar train` and `exemplar quickstart`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback


def register(commands: argparse._SubParsersAction) -> None:
    from exemplar.cli import add_config_arguments

    train = commands.add_parser("train", help="fine-tune a model as the config says")
    add_config_arguments(train)
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (one per GPU): a shortcut that launches "
        "`torchrun --standalone --nproc_per_node N -m exemplar train ...`",
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
    from exemplar.errors import ExemplarError
    from exemplar.train.distributed import launched_rank, launched_world_size
    from exemplar.train.finetune import finetune

    if args.nproc is not None:
        if args.nproc < 1:
            raise ExemplarError(f"--nproc must be at least 1, got {args.nproc}")
        if launched_world_size() > 1:
            raise ExemplarError("--nproc launches torchrun itself: do not combine it with torchrun")
        if args.nproc > 1:
            return launch_torchrun(args)
    world_size, rank = launched_world_size(), launched_rank()
    if world_size <= 1:
        summary = finetune(load_config(args.config, args.overrides), resume=args.resume)
    else:
        # Under torchrun: a failing rank says which it is, and leaves with a non-zero status;
        # torchrun then stops the other ranks (waiting in a collective for this one).
        try:
            summary = finetune(load_config(args.config, args.overrides), resume=args.resume)
        except ExemplarError as e:
            print(f"rank {rank}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except Exception as e:
            if _peer_failed(e):  # a consequence: the rank that failed first has said why
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(
                    f"rank {rank}: stopped: another rank failed ({first_line})", file=sys.stderr, flush=True
                )
                return 1
            traceback.print_exc()
            print(f"rank {rank}: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return 1
        if rank != 0:
            return 0
    keys = ("steps", "tokens", "trained_tokens", "train_wall_s", "tokens_per_s", "final_loss", "peak_rss_mb")
    print(json.dumps({k: summary.get(k) for k in keys} | {"outputs": summary.get("outputs")}, indent=2))
    return 0


# How a collective reports that the rank at the other end has gone (Gloo, NCCL).
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote process exited",
    "NCCL communicator was aborted",
)


def _peer_failed(error: Exception) -> bool:
    return any(marker in str(error) for marker in _PEER_GONE)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """`exemplar train --nproc N ...` as the torchrun command it stands for (torchrun's own module)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "exemplar",
    ]
    if getattr(args, "verbose", False):
        command.append("-v")
    command += ["train", args.config]
    for item in args.overrides:
        command += ["--set", item]
    if args.resume:
        command.append("--resume")
    return command


def launch_torchrun(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    # torchrun sets one OpenMP thread per process (and warns) when unset; say so ourselves.
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_command(args), env=env)


def run_quickstart(args: argparse.Namespace) -> int:
    from exemplar.quickstart import run_quickstart as quickstart

    quickstart(args.out, steps=args.steps)
    return 0
