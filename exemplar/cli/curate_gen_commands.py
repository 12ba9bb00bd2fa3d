"""`exemplar curate distill | best-of-k | iterate`: curation stages that generate with a model.

distill and best-of-k write --out DIR like every curation stage (kept.jsonl, removed.jsonl,
summary.json) plus failed.jsonl; with --base-url the answers are cached in DIR/http_cache, so a
rerun after a kill or a failed request asks the server only for what it did not answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(verbs: argparse._SubParsersAction) -> None:
    distill = verbs.add_parser("distill", help="answer every prompt with a teacher model (distillation)")
    _inputs(distill)
    distill.add_argument(
        "--teacher", required=True, help="a model folder, or with --base-url the served model's name"
    )
    distill.add_argument("--system", default=None, help="a system prompt sent to the teacher only")
    distill.add_argument(
        "--turns", choices=("all", "last"), default="all", help="regenerate every assistant turn, or the last"
    )
    distill.add_argument(
        "--keep-truncated",
        action="store_true",
        help="keep answers cut at --max-new-tokens (default: removed)",
    )
    _generation(distill)
    distill.set_defaults(handler=run_distill)

    best = verbs.add_parser("best-of-k", help="K sampled responses per prompt, scored, the best kept")
    _inputs(best)
    best.add_argument(
        "--model", required=True, help="a model folder, or with --base-url the served model's name"
    )
    best.add_argument("--k", type=int, required=True, help="responses per prompt, each with its own seed")
    best.add_argument(
        "--scorer", required=True, help="e.g. verifier:module:function, reward:PATH, judge:MODEL"
    )
    best.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="a response passes at this score; prompts with none passing are removed (rejection sampling)",
    )
    best.add_argument(
        "--keep", choices=("best", "all-passing", "distinct-passing"), default="best", help="what is kept"
    )
    best.add_argument(
        "--distinct-threshold",
        type=float,
        default=0.8,
        help="distinct-passing: responses at this MinHash Jaccard similarity or more are one response",
    )
    _generation(best, temperature=1.0)
    best.set_defaults(handler=run_best_of_k)

    iterate = verbs.add_parser(
        "iterate", help="rounds of sample, keep the verified best, fine-tune, evaluate"
    )
    iterate.add_argument("config", help="the YAML config (its curate.iterate: section)")
    iterate.add_argument("--rounds", type=int, required=True)
    iterate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    iterate.add_argument("--no-progress", action="store_true")
    iterate.set_defaults(handler=run_iterate)


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="PROMPTS", help="data files in any supported format")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--config", default=None, help="a config whose data.train is read without PROMPTS")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _generation(parser: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    from exemplar.cli.model_commands import _add_server_flags

    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the first request's seed")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per model.generate call (local)")
    _add_server_flags(parser)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="with --base-url: where answers are kept for a rerun (default: OUT/http_cache; 'none': off)",
    )


def _sampling(args: argparse.Namespace):
    from exemplar.curate.generation_stage import Sampling
    from exemplar.errors import ConfigError

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def _generator(args: argparse.Namespace, model: str):
    """The backend model_commands builds for `exemplar generate`, with the cache in OUT."""
    from exemplar.cli.model_commands import _generator as build
    from exemplar.curate.generation_stage import CACHE_DIR

    cache_dir = None
    if args.base_url and (args.cache_dir or "").lower() != "none":
        cache_dir = args.cache_dir or str(Path(args.out) / CACHE_DIR)
    return build(argparse.Namespace(**vars(args), model_dir=model), cache_dir)


def _records(args: argparse.Namespace):
    from exemplar.curate.io import read_inputs

    return read_inputs(args.inputs, load_config_or_none(args))


def _report(out: str, summary: dict) -> int:
    removed = ", ".join(f"{k} {v}" for k, v in summary["removed"].items()) or "none"
    stats = summary.get("generation", {})
    print(
        f"{summary['in']} prompts: {summary['kept']} rows kept, removed: {removed}, failed {summary['failed']}; "
        f"{stats.get('requests', 0)} requests ({stats.get('cache_hits', 0)} answers from the cache); "
        f"written to {out}"
    )
    if summary["failed"]:
        print(
            f"{summary['failed']} prompts failed after retries (errors in {Path(out) / 'failed.jsonl'}); "
            "rerun the same command to retry them: answered prompts come from the cache",
            file=sys.stderr,
        )
        return 1
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from exemplar.curate.distill import distill
    from exemplar.curate.generation_stage import GenerationWriter

    sampling = _sampling(args)
    options = {
        "teacher": args.teacher,
        "base_url": args.base_url,
        "turns": args.turns,
        "system": args.system,
        "keep_truncated": args.keep_truncated,
        **sampling.to_dict(),
    }
    records = _records(args)
    with (
        _generator(args, args.teacher) as generator,
        GenerationWriter(args.out, "distill", options) as writer,
    ):
        distill(
            records,
            writer,
            generator,
            args.teacher,
            sampling=sampling,
            turns=args.turns,
            system=args.system,
            base_url=args.base_url,
            keep_truncated=args.keep_truncated,
            progress=not args.no_progress,
        )
    return _report(args.out, writer.summary())


def run_best_of_k(args: argparse.Namespace) -> int:
    from exemplar.curate.best_of_k import BestOfK, best_of_k
    from exemplar.curate.generation_stage import GenerationWriter

    sampling = _sampling(args)
    plan = BestOfK(args.k, args.keep, args.min_score, args.distinct_threshold)
    options = {"model": args.model, "base_url": args.base_url, "scorer": args.scorer, **plan.to_dict()}
    options.update(sampling.to_dict())
    scorer = plan.scorer(args.scorer, load_config_or_none(args))
    records = _records(args)
    with (
        _generator(args, args.model) as generator,
        GenerationWriter(args.out, "best-of-k", options) as writer,
    ):
        best_of_k(
            records,
            writer,
            generator,
            scorer,
            plan,
            sampling=sampling,
            model=args.model,
            progress=not args.no_progress,
        )
    summary = writer.summary()
    rates = summary["pass_rate"]
    print(
        f"pass@1 {rates['at_1']:.3f}, pass@{plan.k} {rates['at_k']:.3f} (a pass: score >= {rates['threshold']:g})"
    )
    return _report(args.out, summary)


def load_config_or_none(args: argparse.Namespace):
    from exemplar.config import load_config

    return load_config(args.config, args.overrides) if args.config else None


def run_iterate(args: argparse.Namespace) -> int:
    from exemplar.config import load_config
    from exemplar.curate.iterate import iterate

    config = load_config(args.config, args.overrides)
    result = iterate(
        config, args.rounds, progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr)
    )
    for line in result["table"]:
        print(line)
    return 0
