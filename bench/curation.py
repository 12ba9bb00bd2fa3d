"""Curation beats volume: the same model, steps and seed trained on a large noisy set and on
that set after `exemplar curate`, then held-out exact match and NLL for each.

    python bench/curation.py [--table curation] [--steps 300] [--work DIR] [--markdown FILE]

On a machine shared with other jobs, OMP_NUM_THREADS=1 keeps torch's threads from spinning
while they wait for each other (measured here: 55 s a step with two threads on a 2-core machine
under load 17).

Data (bench/curation_data.py): the quickstart's letter-reversal task, with wrong answers,
refusals, repeated answers and a few rows copied many times. Curation, each stage through the
CLI on the previous stage's kept.jsonl:

1. `exemplar curate score --scorer verifier:bench/curation_data.py:reversal_verified`
   (`meta.scores.verifier`: 1 for a right answer, 0 for a wrong one);
2. `exemplar curate filter --min-score verifier=1` (refusals, repetition, wrong answers);
3. `exemplar curate dedup --method minhash` (the copies);
4. `exemplar curate select --n N --by diversity` (greedy k-center on the prompts' embeddings,
   the curate extra's default all-MiniLM-L6-v2): N rows (SELECT_N, 1,000: a quarter of what
   dedup keeps) spread over the phrasings and letter lists. By diversity, not by score:
   every row the filter keeps has verifier 1, so a score has nothing left to rank.

Five training sets, each trained from the same initial weights for the same steps and seed:
the noisy set; N rows of it drawn at random (seeded), the curated set's size, so that the table
tells "fewer rows" from "better rows"; the set after filter + dedup (what select starts from);
N rows of that drawn at random, so that select's choice is told from its size; and the curated
set (after select). The differences (paired bootstrap) are the curated set's minus each other's.

Training: the quickstart's recipe (exemplar/quickstart.py: 1.8M-parameter Llama, the shipped
tokenizer, packing) through `exemplar.finetune`; evaluation through `exemplar.evaluate_models`
on the held-out reversals (letter lists never seen in training).

Each table is a function in TABLES; issue 14's distillation and rejection-sampling tables are
meant to be added there, reusing `train` and `evaluate`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curation_data import NOISE_KINDS, NoiseSizes, make_noisy_set  # noqa: E402

MAX_NEW_TOKENS = 24


# ---- curation --------------------------------------------------------------------------------


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def exemplar_cli(*argv: str) -> None:
    from exemplar.cli import main

    if main([*argv, "--no-progress"]) != 0:
        raise SystemExit(f"exemplar {' '.join(argv)} failed")


VERIFIER = f"verifier:{Path(__file__).resolve().parent / 'curation_data.py'}:reversal_verified"


STAGES = ("score", "filter", "dedup", "select")
SELECT_N = 1000


def curate(noisy: Path, work: Path, n: int = SELECT_N) -> tuple[Path, list[dict[str, Any]]]:
    """Run the stages, each in work/STAGE on the previous one's kept.jsonl; return the final
    kept.jsonl and each stage's summary.json, in STAGES order."""
    options = {
        "score": ("--scorer", VERIFIER),
        "filter": ("--min-score", "verifier=1"),
        "dedup": ("--method", "minhash"),
        "select": ("--n", str(n), "--by", "diversity"),
    }
    previous = noisy
    for stage in STAGES:
        exemplar_cli("curate", stage, str(previous), "--out", str(work / stage), *options[stage])
        previous = work / stage / "kept.jsonl"
    return previous, [json.loads((work / s / "summary.json").read_text()) for s in STAGES]


def random_rows(path: Path, n: int, seed: int, out: Path) -> Path:
    """`n` rows of `path` drawn at random (seeded), in input order: the noisy set at the curated
    set's size."""
    rows = read_jsonl(path)
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return write_jsonl([rows[i] for i in picked], out)


def noise_counts(path: Path) -> Counter:
    return Counter(r["meta"]["noise"] for r in read_jsonl(path))


# ---- training and evaluation (shared by every table) --------------------------------------------


def train_config(data: Path, out: Path, steps: int, seed: int) -> Any:
    from exemplar.config import load_config
    from exemplar.quickstart import MODEL, TRAIN, tokenizer_path

    return load_config(
        None,
        model={"from_config": MODEL},
        tokenizer=tokenizer_path(),
        data={"train": [{"path": str(data)}], "cache_dir": str(out / "cache")},
        max_length=128,
        packing=True,
        train=dict(TRAIN, max_steps=steps, seed=seed, save_every=None),
        output_dir=str(out),
    )


def train(data: Path, out: Path, steps: int, seed: int) -> dict[str, Any]:
    """Train the quickstart model on `data`; the summary, with the exported model's folder."""
    import exemplar

    shutil.rmtree(out, ignore_errors=True)  # a bench run starts afresh (no resume, no stale cache)
    start = time.perf_counter()
    summary = exemplar.finetune(train_config(data, out, steps, seed), progress=False)
    return {**summary, "model_dir": str(out / "model"), "wall_s": time.perf_counter() - start}


def evaluate(models: dict[str, str], heldout: Path, out: Path, config: Any) -> dict[str, Any]:
    """Held-out exact match and NLL for each model (the first is the base of the differences)."""
    import exemplar

    specs = [f"{name}={path}" for name, path in models.items()]
    return exemplar.evaluate_models(
        specs, heldout, out, max_new_tokens=MAX_NEW_TOKENS, batch_size=64, config=config
    )


def markdown_table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| --- " + "| ---: " * (len(head) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


# ---- tables --------------------------------------------------------------------------------------


def table_curation(work: Path, steps: int, seed: int) -> str:
    rows, heldout = make_noisy_set(NoiseSizes(), seed=seed)
    noisy = write_jsonl(rows, work / "data" / "noisy.jsonl")
    heldout_path = write_jsonl(heldout, work / "data" / "heldout.jsonl")
    curated, summaries = curate(noisy, work / "curate")
    n = summaries[-1]["kept"]
    deduped, clean_random = work / "curate" / "dedup" / "kept.jsonl", work / "data" / "clean-random.jsonl"
    sets = {
        "noisy": ("noisy", noisy),
        "random": (f"noisy, {n:,} random rows", random_rows(noisy, n, seed, work / "data" / "random.jsonl")),
        "deduped": ("filter + dedup", deduped),
        "deduped_random": (f"filter + dedup, {n:,} random rows", random_rows(deduped, n, seed, clean_random)),
        "curated": ("filter + dedup + select", curated),
    }
    runs = {name: train(path, work / "runs" / name, steps, seed) for name, (_, path) in sets.items()}
    config = train_config(noisy, work / "runs" / "noisy", steps, seed)
    # The curated model first: evaluate_models' differences are against the first model.
    models = {"curated": runs["curated"]["model_dir"]} | {name: r["model_dir"] for name, r in runs.items()}
    result = evaluate(models, heldout_path, work / "eval", config)
    table = []
    for name, (label, path) in sets.items():
        m, iv, counts = result["models"][name], result["intervals"][name], noise_counts(path)
        table.append(
            [
                label,
                f"{sum(counts.values()):,}",
                ", ".join(f"{k} {counts[k]}" for k in NOISE_KINDS if counts[k]) or "none",
                f"{m['exact_match']:.3f} [{iv['exact_match'][0]:.3f}, {iv['exact_match'][1]:.3f}]",
                f"{m['nll']:.3f} [{iv['nll'][0]:.3f}, {iv['nll'][1]:.3f}]",
                f"{m['stop_rate']:.3f}",
                f"{runs[name]['wall_s']:.0f}",
            ]
        )
    head = [
        "training set",
        "rows",
        "noise rows in it",
        "held-out exact match [95% CI]",
        "held-out NLL [95% CI]",
        "stop rate",
        "train s",
    ]
    stages = [
        [
            f"`curate {s['stage']}`",
            f"{s['in']:,}",
            f"{s['kept']:,}",
            ", ".join(f"{k} {v:,}" for k, v in s["removed"].items()) or "none",
        ]
        for s in summaries
    ]
    differences = "; ".join(
        f"{sets[name][0]}: exact match {_negated(d['exact_match'])}, NLL {_negated(d['nll'])}"
        for name, d in result["differences"].items()
    )
    return (
        markdown_table(["stage", "rows in", "kept", "removed"], stages)
        + "\n\n"
        + markdown_table(head, table)
        + f"\n\nCurated (filter + dedup + select) minus each other set (paired bootstrap): {differences}. "
        f"{len(heldout)} held-out reversals, {steps} steps, seed {seed}, the same initial weights."
    )


def _negated(d: dict[str, float]) -> str:
    """The curated model minus another, from evaluate_models' other minus curated."""
    return f"{-d['value']:+.3f} [{-d['high']:+.3f}, {-d['low']:+.3f}]"


TABLES: dict[str, Callable[[Path, int, int], str]] = {"curation": table_curation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=sorted(TABLES), nargs="+", default=["curation"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/exemplar-curation-bench"))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    text = "\n\n".join(
        f"### {name}\n\n" + TABLES[name](args.work / name, args.steps, args.seed) for name in args.table
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
