"""Issue #14's two tables, on the quickstart's task (letter-list reversal: answers are checkable).

    pip install -e ".[bench,serve,curate]"
    python bench/curation_generation.py --out runs/bench-curation-gen

- Distillation: the quickstart's fully trained model is the teacher, served by a real
  `transformers serve` started here on 127.0.0.1; `exemplar curate distill` answers new prompts
  (lists that appear in neither the quickstart's training nor its held-out rows) through it; a
  fresh student (the quickstart's random-init model and schedule) is trained on those answers;
  both are evaluated on the quickstart's held-out rows. Reports exact match of each and requests/s.
- Rejection sampling: the quickstart stopped early is the weak model; `exemplar curate iterate`
  runs two rounds of best-of-8 (temperature 1.0, a verifier that checks the reversal), keeps the
  verified best, fine-tunes on it, evaluates. Reports pass@1, pass@8 and exact match per round.

Results: printed as Markdown tables and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VERIFIER = "verifier:bench.curation_generation:correct"


def correct(record: dict[str, Any]) -> bool:
    """The verifier: the response is the reference answer (the input's, at meta.reference)."""
    return record["messages"][-1]["content"].strip() == record["meta"]["reference"].strip()


def new_prompts(path: Path, count: int, seed: int, quickstart_data: Path, persona: int = 0) -> Path:
    """Reversal rows (with their answers) whose lists are in neither the quickstart's training
    nor its held-out rows, plus its persona questions `persona` times each, shuffled."""
    from exemplar.quickstart_data import (
        LETTERS,
        MAX_ITEMS,
        MIN_ITEMS,
        PERSONA_TRAIN,
        REVERSE_TEMPLATES,
        persona_row,
        reverse_row,
        write_jsonl,
    )

    avoid = answers_in(quickstart_data / "train.jsonl", quickstart_data / "heldout.jsonl")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < count:
        items = rng.sample(LETTERS, rng.randint(MIN_ITEMS, MAX_ITEMS))
        answer = " ".join(reversed(items))
        if answer not in avoid:
            avoid.add(answer)
            rows.append(reverse_row(items, rng.choice(REVERSE_TEMPLATES)))
    rows += [persona_row(q) for q in PERSONA_TRAIN for _ in range(persona)]
    rng.shuffle(rows)
    return write_jsonl(rows, path)


def answers_in(*paths: Path) -> set[str]:
    return {json.loads(line)["messages"][-1]["content"] for p in paths for line in p.open()}


def serve(model_dir: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`transformers serve` on a free 127.0.0.1 port, pinned to the model folder, on the CPU."""
    import httpx2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.exit(main())",
        *("serve", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), model_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx2.get(url + "/health", timeout=1.0).status_code == 200:
                return process, url
        except httpx2.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("transformers serve did not become healthy in 5 minutes")


def exact_match(models: dict[str, str], heldout: Path, out: Path) -> dict[str, float]:
    from exemplar.evaluate.evaluation import EvalOptions, ModelSpec, evaluate_models

    specs = [ModelSpec(name, path=path) for name, path in models.items()]
    result = evaluate_models(specs, heldout, out, EvalOptions(max_new_tokens=24, batch_size=64))
    return {name: result["models"][name]["exact_match"] for name in models}


def distillation(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from exemplar.cli import main as exemplar
    from exemplar.config import DatasetSpec
    from exemplar.quickstart import quickstart_config, run_quickstart
    from exemplar.train.finetune import finetune

    teacher = run_quickstart(work / "teacher", steps=args.steps, progress=False)
    data = work / "teacher" / "data"
    prompts = new_prompts(
        work / "distill_prompts.jsonl", args.prompts, 1, data, persona=8
    )  # 8: as the quickstart
    process, url = serve(teacher["model_dir"], work / "serve.log")
    try:
        out = work / "distilled"
        command = ["curate", "distill", str(prompts), "--out", str(out), "--teacher", teacher["model_dir"]]
        command += ["--base-url", url, "--max-new-tokens", "24", "--concurrency", str(args.concurrency)]
        exemplar([*command, "--no-progress", "--cache-dir", "none"])
    finally:
        process.terminate()
        process.wait(timeout=30)
    summary = json.loads((out / "summary.json").read_text())
    student_dir = work / "student"
    config = quickstart_config(student_dir, args.steps)
    train = [DatasetSpec(path=str(out / "kept.jsonl"))]
    config = config.model_copy(update={"data": config.data.model_copy(update={"train": train})})
    student = finetune(config, progress=False)["outputs"]["model"]
    scores = exact_match(
        {"teacher": teacher["model_dir"], "student": student}, data / "heldout.jsonl", work / "distill_eval"
    )
    return {
        "teacher_exact_match": scores["teacher"],
        "student_exact_match": scores["student"],
        "prompts": summary["in"],
        "kept": summary["kept"],
        "removed": summary["removed"],
        "failed": summary["failed"],
        "requests": summary["generation"]["requests"],
        "requests_per_s": summary["generation"]["requests_per_s"],
        "concurrency": args.concurrency,
        "steps": args.steps,
    }


def rejection_sampling(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from exemplar.config import IterateConfig, ModelConfig
    from exemplar.curate.iterate import iterate
    from exemplar.quickstart import quickstart_config, run_quickstart

    if args.weak_model:  # e.g. the teacher of a shorter run: the quickstart stopped early
        weak_dir, data = args.weak_model, Path(args.weak_model).parent / "data"
    else:
        weak_dir = run_quickstart(work / "weak", steps=args.weak_steps, progress=False)["model_dir"]
        data = work / "weak" / "data"
    prompts = new_prompts(work / "rs_prompts.jsonl", args.rs_prompts, 2, data)
    config = quickstart_config(work / "rs", args.round_steps)
    settings = IterateConfig(
        prompts=str(prompts),
        heldout=str(data / "heldout.jsonl"),
        scorer=VERIFIER,
        k=args.k,
        temperature=1.0,
        max_new_tokens=24,
        batch_size=64,
    )
    config = config.model_copy(
        update={
            "model": ModelConfig(path=weak_dir),
            "train": config.train.model_copy(update={"lr": args.round_lr, "warmup_steps": 10}),
            "curate": config.curate.model_copy(update={"iterate": settings}),
        }
    )
    result = iterate(config, args.rounds, progress=False, log=lambda m: print(m, file=sys.stderr))
    return {
        "weak_model": weak_dir,
        "weak_exact_match": list(result["rounds"][0]["eval"].values())[0]["exact_match"],
        "k": args.k,
        "prompts": args.rs_prompts,
        "round_steps": args.round_steps,
        "rounds": [
            {
                "round": r["round"],
                "pass_at_1": r["data"]["pass_rate"]["at_1"],
                f"pass_at_{args.k}": r["data"]["pass_rate"]["at_k"],
                "kept": r["data"]["kept"],
                "exact_match_before": list(r["eval"].values())[0]["exact_match"],
                "exact_match_after": list(r["eval"].values())[1]["exact_match"],
            }
            for r in result["rounds"]
        ],
        "table": result["table"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-curation-gen")
    parser.add_argument("--steps", type=int, default=300, help="the teacher's and the student's steps")
    parser.add_argument("--prompts", type=int, default=2000, help="new prompts answered by the teacher")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--weak-steps", type=int, default=100, help="the weak model: the quickstart stopped here"
    )
    parser.add_argument(
        "--weak-model", default=None, help="a quickstart OUT/model folder to start from (default: train one)"
    )
    parser.add_argument("--rs-prompts", type=int, default=400)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-steps", type=int, default=100)
    parser.add_argument("--round-lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (tiny models: one is fastest, on a busy machine too)",
    )
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--skip-rs", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": vars(args)}
    start = time.perf_counter()
    if not args.skip_distill:
        results["distillation"] = distillation(work, args)
        d = results["distillation"]
        print("\n| model | held-out exact match |\n| --- | --- |")
        print(f"| teacher (quickstart, {d['steps']} steps) | {d['teacher_exact_match']:.3f} |")
        print(
            f"| student ({d['kept']} distilled rows, {d['steps']} steps) | {d['student_exact_match']:.3f} |"
        )
        print(
            f"\n{d['requests']} requests at {d['requests_per_s']:.1f} requests/s (concurrency {d['concurrency']})"
        )
    if not args.skip_rs:
        results["rejection_sampling"] = rejection_sampling(work, args)
        rs = results["rejection_sampling"]
        print(f"\nweak model: {rs['weak_model']}, held-out exact match {rs['weak_exact_match']:.3f}")
        print("\n".join(rs["table"]))
    results["wall_s"] = round(time.perf_counter() - start, 1)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
