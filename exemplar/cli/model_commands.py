"""`exemplar chat`, `exemplar generate` and `exemplar merge`: use a trained model."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="chat with a model folder in the terminal (streams tokens)")
    chat.add_argument("model_dir")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.set_defaults(handler=run_chat)

    gen = commands.add_parser("generate", help="batched generation for a JSONL file of prompts")
    gen.add_argument("model_dir")
    gen.add_argument("--input", required=True, help='JSONL rows of {"prompt": ...} or {"messages": [...]}')
    gen.add_argument("--output", required=True, help="JSONL: the input rows plus response and stopped")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--system", default=None)
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


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exemplar.errors import ExemplarError

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ExemplarError(f"cannot load a model from '{model_dir}': {e}") from None
    model.eval()
    return model, tokenizer


def run_chat(args: argparse.Namespace) -> int:
    from exemplar.data.encode import prompt_encoder
    from exemplar.evaluate.chat import chat_loop

    model, tokenizer = _load(args.model_dir)
    chat_loop(
        model,
        tokenizer,
        encode_prompt=prompt_encoder(tokenizer),
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from exemplar.data.encode import prompt_encoder
    from exemplar.evaluate.generation import generate_file

    count = generate_file(
        args.model_dir,
        args.input,
        args.output,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        encode_prompt=prompt_encoder(AutoTokenizer.from_pretrained(args.model_dir)),
        system=args.system,
    )
    print(f"wrote {count} responses to {args.output}")
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
