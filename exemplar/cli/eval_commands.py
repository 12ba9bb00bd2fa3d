"""`exemplar eval`: compare models on held-out conversations (likelihood, generation, judge)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser(
        "eval",
        help="compare models on held-out conversations: NLL, generation checks, few-shot base, forgetting",
    )
    ev.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a model folder (NAME=PATH) or a served model (NAME=URL#served-name); repeatable, the first is the base",
    )
    ev.add_argument(
        "--data", required=True, metavar="HELDOUT", help="held-out conversations (any supported format)"
    )
    ev.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/eval.json, eval_examples.jsonl, eval.md"
    )
    ev.add_argument(
        "--general", metavar="TEXT", help="general text (plain lines or any format): NLL for forgetting"
    )
    ev.add_argument(
        "--few-shot", type=int, default=0, metavar="K", help="add the base with K worked examples"
    )
    ev.add_argument("--shots", metavar="FILE", help="where the few-shot examples come from (default: --data)")
    ev.add_argument(
        "--config", help="the training config: its mask, max_length and truncation apply to the NLL"
    )
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts per model.generate call (local)")
    ev.add_argument("--regex", help="also score whether each response matches this regular expression")
    ev.add_argument("--json-schema", metavar="FILE", help="also score JSON-schema conformance")
    ev.add_argument("--verifier", metavar="MODULE:FUNCTION", help="f(record, response) -> bool or number")
    ev.add_argument("--judge", metavar="NAME=URL#served", help="an LLM judge (served or a local folder)")
    ev.add_argument("--judge-prompt", metavar="FILE", help="the judge's prompt template (default: shipped)")
    ev.add_argument(
        "--reference", metavar="NAME", help="the model the judge compares against (default: references)"
    )
    ev.add_argument(
        "--lm-eval-task",
        dest="lm_eval_tasks",
        action="append",
        default=[],
        metavar="TASK.yaml",
        help="also run an lm-evaluation-harness task file on each model folder (the eval extra); repeatable",
    )
    ev.add_argument("--lm-eval-limit", type=int, default=None, help="at most this many documents per task")
    ev.add_argument("--bootstrap-seed", type=int, default=0)
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ev.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from exemplar.config import load_config
    from exemplar.errors import ConfigError
    from exemplar.evaluate.evaluation import EvalOptions, ModelSpec, evaluate_models

    schema = None
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--json-schema {args.json_schema}: {e}") from None
    options = EvalOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        regex=args.regex,
        json_schema=schema,
        verifier=args.verifier,
        few_shot=args.few_shot,
        shots=args.shots,
        general=args.general,
        judge=ModelSpec.parse(args.judge, "--judge") if args.judge else None,
        judge_prompt=args.judge_prompt,
        reference=args.reference,
        lm_eval_tasks=args.lm_eval_tasks,
        lm_eval_limit=args.lm_eval_limit,
        config=load_config(args.config) if args.config else None,
        device=args.device,
        bootstrap_seed=args.bootstrap_seed,
    )
    result = evaluate_models(args.models, args.data, args.out, options)
    print(result["table"], end="")
    print(f"Written: {Path(args.out) / 'eval.json'}, eval_examples.jsonl, eval.md")
    return 0
