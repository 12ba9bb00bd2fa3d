"""Exemplar vs TRL's SFTTrainer on the same workload, side by side.

    pip install -e ".[bench]"
    python bench/run.py --steps 20                 # fp32 and bf16 training, data preparation, ceiling
    python bench/run.py --precision fp32 --skip-trl --skip-prep
    python bench/run.py --preset gpu --precision bf16 --method full lora --skip-prep   # on a GPU

Each measurement runs in its own child process (`exemplar_side.py`, `trl_side.py`), so peak RSS
is that run's alone; the two tools alternate, so a busy machine slows both alike. Results are
printed as tables and written as JSON (`--json`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent


QUIET_WAIT_S = 0.0


def child(script: str, *args: str) -> dict:
    """Run a side script in a fresh interpreter and return the JSON it reports."""
    idle = common.wait_until_quiet(QUIET_WAIT_S) if QUIET_WAIT_S > 0 else common.cpu_idle(1.0)
    cmd = [sys.executable, str(HERE / script), *args]
    common.log(f"{' '.join(cmd[1:])}   (idle before: {idle:.0%})")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT ") :])
            result["idle_before"] = idle
            return result
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"{script} {' '.join(args)} failed (exit {proc.returncode})")


def train_pair(tools: list[str], workdir: Path, steps: int, precision: str, method: str, preset: str) -> dict:
    """One training run of each tool on the prepared workload: {tool: its side's report}."""
    extra = [] if method == "full" else ["--method", method]  # the reference command lines stay as they were
    extra += [] if preset == "cpu" else ["--preset", preset]
    return {
        tool: child(
            f"{tool}_side.py", "train", str(workdir), "--steps", str(steps), "--precision", precision, *extra
        )
        for tool in tools
    }


# ---------------------------------------------------------------------------------------------
# Tables


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def train_rows(runs: dict, rates: dict) -> list[dict]:
    rows = []
    for tool, r in runs.items():
        wall = r["wall_s"]
        flops = common.step_flops(r["tokens"], r["trained"], r["doc_sq_sum"])  # over the whole run
        tail = r["losses"][-5:]
        rows.append(
            {
                "tool": tool,
                "tokens_per_s": r["tokens"] / wall,
                "trained_per_s": r["trained"] / wall,
                "peak_rss_gb": r["peak_rss_mb"] / 1024,
                "loss": r["losses"][-1] if r["losses"] else float("nan"),
                "loss_tail": sum(tail) / len(tail) if tail else float("nan"),
                "s_per_step": wall / r["steps"],
                "tflop_per_step": flops / r["steps"] / 1e12,
                "gflops": flops / wall / 1e9,
                "mfu": flops / wall / 1e9 / rates[r["precision"]],
                "fill": r["fill_ratio"],
                **({"peak_gpu_gb": r["peak_gpu_mb"] / 1024} if "peak_gpu_mb" in r else {}),
                "load": r["load"],
                "idle_before": r.get("idle_before", float("nan")),
            }
        )
    return rows


def print_train(title: str, rows: list[dict], steps: int) -> str:
    lines = [f"### {title}", ""]
    lines.append(
        f"| tool | tokens/s | trained tokens/s | peak RSS (GB) | loss at step {steps} | mean loss, last 5 steps "
        "| s/step | useful TFLOP/step | useful GFLOP/s | of matmul ceiling | bin fill | cores idle before |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        lines.append(
            f"| {r['tool']} | {r['tokens_per_s']:.0f} | {r['trained_per_s']:.0f} | {r['peak_rss_gb']:.2f} "
            f"| {r['loss']:.4f} | {r['loss_tail']:.4f} | {r['s_per_step']:.2f} | {r['tflop_per_step']:.3f} "
            f"| {r['gflops']:.0f} | {r['mfu']:.0%} | {r['fill']:.1%} | {r['idle_before']:.0%} |"
        )
    by = {r["tool"]: r for r in rows}
    if "exemplar" in by and "trl" in by:
        e, t = by["exemplar"], by["trl"]
        lines.append(
            f"| **Exemplar / TRL** | **{_ratio(e['tokens_per_s'], t['tokens_per_s'])}** "
            f"| **{_ratio(e['trained_per_s'], t['trained_per_s'])}** "
            f"| **{_ratio(e['peak_rss_gb'], t['peak_rss_gb'])}** "
            f"| {e['loss'] - t['loss']:+.4f} | {e['loss_tail'] - t['loss_tail']:+.4f} "
            f"| {_ratio(e['s_per_step'], t['s_per_step'])} | | | | | |"
        )
    if all("peak_gpu_gb" in r for r in rows):
        lines.append("")
        lines.append(
            "Peak GPU memory (torch.cuda.max_memory_allocated): "
            + ", ".join(f"{r['tool']} {r['peak_gpu_gb']:.2f} GB" for r in rows)
        )
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def print_prep(results: list[dict], rows: int, distinct_rows: int) -> str:
    source = (
        "alpaca_en_demo.json repeated" if rows > distinct_rows else "alpaca_en_demo.json, no row repeated"
    )
    lines = [f"### Data preparation: {rows:,} rows ({source}), max length 512", ""]
    lines.append(
        "| tool | processes | seconds | rows/s | examples kept | packed rows | bin fill | peak RSS (GB) |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        kept = f"{r['kept']:,}" if r.get("kept") is not None else "-"
        lines.append(
            f"| {r['tool']} | {r['num_proc']} | {r['seconds']:.2f} | {r['rows'] / r['seconds']:,.0f} | {kept} "
            f"| {r['bins']:,} | {r['fill_ratio']:.1%} | {r['peak_rss_mb'] / 1024:.2f} |"
        )
    best = {}
    for r in results:
        if r["tool"] not in best or r["seconds"] < best[r["tool"]]["seconds"]:
            best[r["tool"]] = r
    if "exemplar" in best and "trl" in best:
        for n in sorted({r["num_proc"] for r in results}):
            pair = {r["tool"]: r for r in results if r["num_proc"] == n}
            if "exemplar" in pair and "trl" in pair:
                lines.append(
                    f"| **TRL / Exemplar, {n} process{'es' if n > 1 else ''}** | | "
                    f"**{_ratio(pair['trl']['seconds'], pair['exemplar']['seconds'])}** | | | | | | |"
                )
        lines.append(
            f"| **TRL best / Exemplar best** | | **{_ratio(best['trl']['seconds'], best['exemplar']['seconds'])}** "
            "| | | | | | |"
        )
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training run")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--data-rows", type=int, default=50_000, help="rows for the data-preparation timing")
    parser.add_argument(
        "--num-proc", type=int, nargs="+", default=[1, 2], help="process counts for data prep"
    )
    parser.add_argument(
        "--preset",
        choices=["cpu", *common.PRESETS],
        default="cpu",
        help="workload: cpu (the reference, needs the shared data), gpu (Qwen2.5-0.5B shape, length 2048, "
        "synthetic rows), tiny (gpu's CPU dry run)",
    )
    parser.add_argument(
        "--method", choices=["full", "lora"], nargs="+", default=["full"], help="training methods to time"
    )
    parser.add_argument("--skip-trl", action="store_true", help="run Exemplar only")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-prep", action="store_true")
    parser.add_argument(
        "--whole-text",
        action="store_true",
        help="data prep: also run Exemplar with the BPE word cache off (whole messages to the tokenizer)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the report (tables) here")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S seconds for the cores to be idle (a shared machine)",
    )
    args = parser.parse_args()
    global QUIET_WAIT_S
    QUIET_WAIT_S = args.quiet_wait
    common.apply_preset(args.preset)
    if args.preset != "cpu" and not args.skip_prep:
        raise SystemExit(f"--preset {args.preset} times training only: pass --skip-prep")

    if args.preset == "cpu" and (not common.ALPACA.is_file() or not common.LLAMA2_TOKENIZER.is_dir()):
        raise SystemExit(f"the benchmark needs the reference data in {common.SHARED} (EXEMPLAR_SHARED_DATA)")
    tools = ["exemplar"] if args.skip_trl else ["exemplar", "trl"]
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit('TRL is not installed: pip install -e ".[bench]" (or pass --skip-trl)') from None

    with tempfile.TemporaryDirectory(prefix="exemplar-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        setup = common.prepare_workdir(workdir, args.data_rows)
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": common.machine(),
            "versions": common.versions(),
            "setup": setup,
            "load_before": common.loadavg(),
        }
        if QUIET_WAIT_S > 0:
            common.wait_until_quiet(QUIET_WAIT_S)
        rates = {"fp32": common.matmul_rate("fp32"), "bf16": common.matmul_rate("bf16")}
        info["matmul_gflops"] = rates
        body, head = common.matmul_params()
        header = (
            f"- command: `{info['command']}`\n"
            f"- date: {info['date']}\n"
            f"- machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, "
            f"{info['machine']['ram_gib']} GiB RAM; 1-minute load average at the start {info['load_before']:.2f}\n"
            f"- versions: python {info['machine']['python']}, "
            + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
            + "\n"
            f"- model: {common.MODEL_TYPE}, {setup['params'] / 1e6:.1f}M parameters ({body / 1e6:.2f}M in the decoder's "
            f"matmuls + {head / 1e6:.2f}M in the output layer), random init; tokenizer {setup['tokenizer_size']} "
            f"tokens; max length {common.MAX_LENGTH}, {common.SEQS_PER_STEP} sequences a step, lr {common.LR}\n"
            f"- matmul ceiling (2048^3, all cores): fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} "
            "GFLOP/s\n"
        )
        print("\n" + header, flush=True)
        results: dict = {"info": info, "train": {}, "prep": []}
        texts = []
        if not args.skip_train:
            precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
            for precision in precisions:
                for method in args.method:
                    runs = train_pair(tools, workdir, args.steps, precision, method, args.preset)
                    rows = train_rows(runs, rates)
                    key = precision if method == "full" else f"{method}-{precision}"
                    results["train"][key] = {"runs": runs, "rows": rows}
                    title = f"Training, {precision}" + (" (bf16 autocast)" if precision == "bf16" else "")
                    title += f", {method}" if method != "full" else ""
                    texts.append(print_train(f"{title}, {args.steps} steps", rows, args.steps))
        if not args.skip_prep:
            for n in args.num_proc:
                for tool in tools:
                    results["prep"].append(
                        child(f"{tool}_side.py", "prep", str(workdir), "--num-proc", str(n))
                    )
                if args.whole_text:
                    results["prep"].append(
                        child("exemplar_side.py", "prep", str(workdir), "--num-proc", str(n), "--whole-text")
                    )
            texts.append(print_prep(results["prep"], setup["prep_rows"], setup["train_rows"]))
        info["load_after"] = common.loadavg()
        if args.markdown:
            args.markdown.write_text(header + "\n" + "\n\n".join(texts) + "\n")
            common.log(f"wrote {args.markdown}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
            common.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
