"""Exemplar's side of the benchmark, run in its own process (peak RSS is this process's alone).

python bench/exemplar_side.py train WORKDIR --steps 20 --precision fp32
python bench/exemplar_side.py prep WORKDIR --num-proc 1
"""

from __future__ import annotations

import time
from pathlib import Path

import common


def make_config(
    workdir: Path,
    data_file: str,
    precision: str,
    steps: int,
    num_proc: int | None,
    tag: str,
    method: str = "full",
):
    from exemplar.config import load_config

    return load_config(
        None,
        model={"path": str(workdir / "model")},
        tokenizer=str(workdir / "tokenizer"),
        chat_template="chatml",
        data={
            "train": [{"path": str(workdir / data_file), "format": "alpaca"}],
            "num_proc": num_proc,
            "cache_dir": str(workdir / "exemplar-cache"),
        },
        max_length=common.MAX_LENGTH,
        packing=True,
        train={
            "method": method,
            "micro_batch_size": common.SEQS_PER_STEP,
            "grad_accum": 1,
            "max_steps": steps,
            "lr": common.LR,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "seed": common.SEED,
            "precision": precision,
            "gradient_checkpointing": False,
            "max_grad_norm": 1.0,
        },
        output_dir=str(workdir / "runs" / f"exemplar-{tag}"),
    )


def train(workdir: Path, steps: int, precision: str, method: str = "full") -> dict:
    import numpy as np

    from exemplar.data.pipeline import prepare_data
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.model.loading import load_model
    from exemplar.train.batching import TrainPlan, example_lengths
    from exemplar.train.loop import run_training

    config = make_config(
        workdir, "train.json", precision, steps, 1, f"{method}-{precision}-{time.time_ns()}", method
    )
    bundle = load_tokenizer(config)
    data = prepare_data(config, bundle=bundle, use_cache=False, progress=False)
    model = load_model(config.model, config.train, bundle.tokenizer, resolve=config.resolve_path)
    losses: list[float] = []
    summary = run_training(
        config,
        model,
        bundle.tokenizer,
        data.train,
        None,
        progress=False,
        callbacks=[lambda event, row: losses.append(row["loss"]) if event == "step_end" else None],
    )
    # The documents of the steps that ran (the loop's own plan), for the attention FLOPs.
    lengths = example_lengths(data.train)
    plan = TrainPlan.build(
        lengths,
        max_length=config.max_length,
        packing=True,
        micro_batch_size=config.train.micro_batch_size,
        grad_accum=1,
        seed=config.train.seed,
        shuffle=config.data.shuffle,
    )
    docs = [i for _, _, step in plan.iter_steps(0, steps) for row in step for i in row]
    doc_sq = int(np.sum(lengths[docs].astype(np.int64) ** 2))
    return {
        "tool": "exemplar",
        "precision": precision,
        "method": method,
        "steps": summary["steps"],
        "wall_s": summary["train_wall_s"],
        "tokens": summary["tokens"],
        "trained": summary["trained_tokens"],
        "doc_sq_sum": doc_sq,
        "losses": losses,
        "fill_ratio": summary["fill_ratio"],
        "peak_rss_mb": common.peak_rss_mb(),
        **common.peak_gpu(),
        "load": common.loadavg(),
    }


def prep(workdir: Path, num_proc: int, whole_text: bool = False) -> dict:
    import datasets  # noqa: F401 - imported before the clock starts, as TRL's side imports it with trl

    from exemplar.data.pieces import BpeWords
    from exemplar.data.pipeline import prepare_data

    BpeWords.enabled = not whole_text
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.train.batching import TrainPlan, example_lengths

    config = make_config(workdir, "prep.json", "fp32", 1, num_proc, "prep")
    bundle = load_tokenizer(config)  # both sides load their tokenizer before the clock starts
    start = time.perf_counter()
    data = prepare_data(config, bundle=bundle, use_cache=False, progress=False)
    plan = TrainPlan.build(
        example_lengths(data.train),
        max_length=config.max_length,
        packing=True,
        micro_batch_size=config.train.micro_batch_size,
        grad_accum=1,
        seed=config.train.seed,
    )
    seconds = time.perf_counter() - start
    report = data.reports[0]
    return {
        "tool": "exemplar (whole-text tokenization)" if whole_text else "exemplar",
        "num_proc": num_proc,
        "rows": report.rows,
        "kept": report.kept,
        "seconds": seconds,
        "bins": len(plan.sequences),
        "fill_ratio": plan.fill_ratio(config.max_length),
        "peak_rss_mb": common.peak_rss_mb(),
        "load": common.loadavg(),
    }


def main() -> None:
    parser = common.side_parser()
    parser.add_argument("--whole-text", action="store_true", help="prep without the BPE word cache")
    args = common.parse_side_args(parser)
    if args.what == "train":
        common.emit(train(args.workdir, args.steps, args.precision, args.method))
    else:
        common.emit(prep(args.workdir, args.num_proc, args.whole_text))


if __name__ == "__main__":
    main()
