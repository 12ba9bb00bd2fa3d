"""`exemplar chat`, `exemplar generate` and `exemplar merge`: use a trained model, locally or served."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="chat with a model folder or a served model in the terminal")
    chat.add_argument(
        "model_dir", metavar="MODEL", help="a model folder, or with --base-url the served model's name"
    )
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=0)
    _add_server_flags(chat)
    chat.set_defaults(handler=run_chat)

    gen = commands.add_parser("generate", help="batched generation for a JSONL file of prompts (resumable)")
    gen.add_argument(
        "model_dir", metavar="MODEL", help="a model folder, or with --base-url the served model's name"
    )
    gen.add_argument("--input", required=True, help='JSONL rows of {"prompt": ...} or {"messages": [...]}')
    gen.add_argument(
        "--output",
        required=True,
        help="JSONL: the input rows plus response and stopped; rerunning completes a partial file",
    )
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per model.generate call (local)")
    gen.add_argument("--system", default=None)
    gen.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="K",
        help="K responses per prompt, each with its own seed, in a 'responses' list (response = the first)",
    )
    _add_server_flags(gen)
    gen.add_argument(
        "--cache-dir",
        default=None,
        help="with --base-url: where answered requests are kept so a rerun does not ask again "
        "(default: OUTPUT.cache/; 'none' turns the cache off)",
    )
    gen.set_defaults(handler=run_generate)

    merge = commands.add_parser("merge", help="merge a LoRA adapter into its base model")
    base = merge.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="base model folder or Hub id")
    base.add_argument(
        "--config", help="the training config (its model: section names the base, from_config too)"
    )
    merge.add_argument("--adapter", required=True, help="the adapter folder (OUTPUT/adapter)")
    merge.add_argument("--out", required=True, help="where to write the merged model folder")
    merge.set_defaults(handler=run_merge)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=None,
        help="an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve, a hosted API), "
        "e.g. http://127.0.0.1:8000/v1; MODEL is then the served model's name",
    )
    parser.add_argument(
        "--api-key-env", default=None, metavar="NAME", help="the environment variable holding the API key"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    parser.add_argument("--max-retries", type=int, default=6, help="retries on timeouts, 429 and 5xx")
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="at most this many requests per second"
    )


def _generator(args: argparse.Namespace, cache_dir: str | None = None):
    if args.base_url:
        from exemplar.evaluate.http_generator import HttpGenerator

        return HttpGenerator(
            args.base_url,
            args.model_dir,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            rate_limit=args.rate_limit,
            cache_dir=cache_dir,
        )
    from exemplar.evaluate.local import LocalGenerator

    return LocalGenerator.from_folder(args.model_dir, batch_size=getattr(args, "batch_size", 8))


def run_chat(args: argparse.Namespace) -> int:
    from exemplar.evaluate.chat import chat_loop

    with _generator(args) as generator:
        chat_loop(
            generator,
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import sys

    from exemplar.errors import ConfigError
    from exemplar.evaluate.file_generation import generate_file

    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise ConfigError("--num-samples and --max-new-tokens must be at least 1, --temperature at least 0")
    cache_dir = None
    if args.base_url and (args.cache_dir or "").lower() != "none":
        cache_dir = args.cache_dir or f"{args.output}.cache"
    with _generator(args, cache_dir) as generator:
        report = generate_file(
            generator,
            args.input,
            args.output,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            system=args.system,
            num_samples=args.num_samples,
            progress=lambda done, total: print(f"{done}/{total} rows", file=sys.stderr, flush=True),
        )
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.stats.items())
    print(
        f"{args.output}: {report.written} of {report.rows} rows ({report.kept} kept from an earlier run); {counts}"
    )
    if report.failed:
        print(
            f"{len(report.failed)} rows failed (errors in {report.failures_path}); "
            f"{report.rows - report.written} rows not written yet: rerun the same command to complete the file",
            file=sys.stderr,
        )
        return 1
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from exemplar.errors import ConfigError
    from exemplar.model.export import merge_adapter

    if args.config:
        from exemplar.config import load_config

        config = load_config(args.config)
        if config.model is None:
            raise ConfigError(f"{args.config} has no model: section")
        base = config.model
        if base.path:
            base = base.model_copy(update={"path": config.resolve_path(base.path)})
        elif isinstance(base.from_config, str):
            base = base.model_copy(update={"from_config": config.resolve_path(base.from_config)})
        path = merge_adapter(base, args.adapter, args.out, seed=config.train.seed)
    else:
        path = merge_adapter(args.base, args.adapter, args.out)
    print(f"merged model written to {path}")
    return 0
