"""Every GPU path of Exemplar in one short run: one row per check, as JSON and a Markdown table.

The device command line (after `bash bench/gpu_wheels.sh` here; carry [".whl"], timeout_s 560):

    set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"

The CPU dry run (the same orchestration and checks with a tiny model, Gloo instead of NCCL, the
CUDA-only checks recorded as skipped; 70 s on two idle cores, 3.5 minutes on two busy ones):

    python bench/gpu_check.py --cpu-dry-run --out /tmp/gpu-check

What it does: installs the carried wheels (.whl/, from bench/gpu_wheels.sh; not in the dry run)
into /tmp/site, puts them and this working tree first on the import path (exemplar is not installed
there), then runs each check of `CHECKS` (bench/gpu_checks.py) in a forked process of its own with
a time cap: a failure, a crash or an overrun becomes that row's status (`failed: <error>`) and the
next check still runs. A global budget (`--budget`, 450 s) stops the run by itself; a check that no
longer fits is recorded as `skipped: out of time`. gpu_check.json and gpu_check.md are rewritten
after every check, so what ran survives a kill.

Only the standard library is imported before the wheels are installed; the parent process never
touches CUDA (a CUDA context does not survive fork), the checks' processes do. Should an import
initialize CUDA all the same, the checks' processes are spawned instead (info.start_method).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata as md
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITE = Path("/tmp/site")

# (name, GPU cap in seconds, CPU cap, checks whose success it needs), in order of priority: when
# time runs short, the rows at the end are the ones skipped.
CHECKS = [
    ("matmul_bf16", 40, 30, ()),
    ("setup", 90, 40, ()),
    ("full_bf16", 100, 60, ("setup",)),
    ("lora_bf16", 80, 60, ("setup",)),
    ("qlora_nf4", 100, 60, ("setup",)),
    ("trl_full", 120, 90, ("setup",)),
    ("trl_lora", 110, 90, ("setup",)),
    ("packed_exactness_sdpa", 50, 40, ("setup",)),
    ("accumulation_invariance", 80, 60, ("setup",)),
    ("fused_adamw", 30, 20, ()),
    ("torchrun_fsdp2", 70, 60, ("setup",)),
    ("torchrun_ddp", 70, 60, ("setup",)),
    ("fsdp2_cpu_offload", 70, 60, ("setup",)),
    ("qlora_torchrun_ddp", 70, 60, ("setup",)),
    ("qlora_torchrun_fsdp2", 70, 60, ("setup",)),
    ("packed_exactness_flex_attention", 80, 40, ("setup",)),
    ("packed_exactness_flash_attention_2", 50, 40, ("setup",)),
]
START_METHOD = "fork"  # of the checks' processes (see warm_imports)
NAMES = [name for name, *_ in CHECKS]
MIN_START_S = 15  # a check with less time than this left is not started
REPORT_RESERVE_S = 5  # kept back for writing the report at the end
VERSIONED = ["torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "pydantic"]


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    deadline = started + args.budget
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    installed = install_wheels(args.wheels) if not args.cpu_dry_run and not args.no_install else "not asked"
    put_on_path(REPO, HERE)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()

    import common  # noqa: E402 - after the wheels and the path are in place
    import gpu_checks

    common.apply_preset("tiny" if args.cpu_dry_run else "gpu")
    global START_METHOD
    START_METHOD = warm_imports()
    sizes = gpu_checks.SIZES[common.PRESET]
    ctx = gpu_checks.Context(dry_run=args.cpu_dry_run, workdir=workdir, sizes=sizes, preset=common.PRESET)
    report = {"info": machine_info(args, installed, workdir), "rows": []}
    wanted = set(args.only or NAMES)
    wanted |= {need for name, *_, needs in CHECKS if name in wanted for need in needs}
    if args.only:
        wanted.add("matmul_bf16")  # the GPU count and the matmul rate that MFU is measured against
    chosen = [c for c in CHECKS if c[0] in wanted]
    for name, gpu_cap, cpu_cap, needs in chosen:
        cap = cpu_cap if args.cpu_dry_run else gpu_cap
        row = run_one(name, getattr(gpu_checks, name), cap, needs, ctx, report["rows"], deadline)
        report["rows"].append(row)
        learn(ctx, row)
        report["info"]["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(report, out)
        print(f"[gpu_check] {name}: {row['status']} ({row['seconds']:.1f} s)", flush=True)
    report["info"]["elapsed_s"] = round(time.monotonic() - started, 1)
    write_report(report, out)
    print("\n" + markdown(report), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_out = os.environ.get("OUT")
    parser.add_argument(
        "--out", type=Path, default=Path(default_out) if default_out else None, required=not default_out
    )
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU, Gloo, no CUDA")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp dir)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to install (default .whl)")
    parser.add_argument("--no-install", action="store_true", help="do not install the carried wheels")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="CHECK",
        choices=NAMES,
        help="run only these checks (with matmul_bf16 and the checks they need, such as setup)",
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# The machine


def install_wheels(folder: Path) -> str:
    """pip install the carried wheels into /tmp/site (the device README's command), first on the path."""
    wheels = sorted(str(p) for p in folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return "no wheels carried"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip install failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    put_on_path(SITE)
    return f"{len(wheels)} wheels into {SITE}"


def put_on_path(*folders: Path) -> None:
    """First on sys.path here, and on PYTHONPATH for the processes the checks start (torchrun, bench)."""
    for folder in reversed(folders):
        sys.path.insert(0, str(folder))
    parts = [str(f) for f in folders] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))


def warm_imports() -> str:
    """Import what the checks use once, before forking, so no check pays for it; return the start
    method for the checks' processes: fork, unless an import initialized CUDA (which a forked
    process cannot use), then spawn. peft stays out: it may load bitsandbytes, which may touch CUDA."""
    import datasets  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import exemplar.train.finetune  # noqa: F401
    import exemplar.train.loop  # noqa: F401

    return "spawn" if torch.cuda.is_initialized() else "fork"


def machine_info(args: argparse.Namespace, installed: str, workdir: Path) -> dict:
    import torch

    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "-"
    try:  # the device machine's copy of the tree may come without git or .git
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        commit_id = commit.stdout.strip() or "-"
    except OSError:
        commit_id = "-"
    return {
        "mode": "cpu dry run" if args.cpu_dry_run else "gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "cuda_build": torch.version.cuda,
        "versions": versions,
        "exemplar_commit": commit_id,
        "wheels": installed,
        "start_method": START_METHOD,
        "budget_s": args.budget,
        "workdir": str(workdir),
    }


# ---------------------------------------------------------------------------------------------
# Running one check


def run_one(name: str, check, cap: float, needs: tuple, ctx, rows: list[dict], deadline: float) -> dict:
    """Row `name`: `check(ctx)` in its own process for at most `cap` seconds and until `deadline`,
    unless a check in `needs` did not pass (`rows`: the rows so far)."""
    start = time.monotonic()
    row = {"check": name, "status": "", "seconds": 0.0, "numbers": {}, "tolerance": None, "target": None}
    failed = [n for n in needs if not any(r["check"] == n and r["status"] == "ok" for r in rows)]
    left = deadline - start - REPORT_RESERVE_S
    if failed:
        row["status"] = f"skipped: needs {', '.join(failed)}"
    elif left < MIN_START_S:
        row["status"] = "skipped: out of time"
    else:
        timeout = min(cap, left)
        result = in_child(name, check, ctx, timeout)
        if result is None and timeout >= cap:
            result = {"status": f"failed: timed out after its cap of {cap:.0f} s"}
        elif result is None:
            result = {"status": f"skipped: out of time (stopped after {timeout:.0f} s)"}
        row.update({k: v for k, v in result.items() if k in row or k in ("error", "summary", "runs")})
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def in_child(name: str, check, ctx, timeout: float) -> dict | None:
    """`check(ctx)` in a forked process (its own process group); None when it overran `timeout`."""
    result_path = ctx.workdir / "results" / f"{name}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    context = multiprocessing.get_context(START_METHOD)
    process = context.Process(target=_child_main, args=(check, ctx, result_path))
    process.start()
    process.join(timeout)
    if process.is_alive():
        _kill_group(process.pid)
        process.join(10)
        return None
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"status": f"failed: the check's process died (exit code {process.exitcode})"}


def _child_main(check, ctx, result_path: Path) -> None:
    os.setsid()  # its own group: a timeout kills torchrun and the bench's processes with it
    import common  # a spawned process starts from the module defaults

    from exemplar.fsio import atomic_write_text

    common.apply_preset(ctx.preset)
    try:
        result = check(ctx)
    except BaseException as e:  # SystemExit from bench/run.py's children included
        message = " / ".join(line.strip() for line in str(e).strip().splitlines()[:3])
        result = {
            "status": f"failed: {type(e).__name__}: {message}"[:400],
            "error": traceback.format_exc()[-3000:],
        }
    atomic_write_text(result_path, json.dumps(result, default=str))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pid, signal.SIGKILL)


def learn(ctx, row: dict) -> None:
    """What later checks need from earlier rows: the matmul rate (MFU), GPU count, model size."""
    numbers = row["numbers"]
    if row["check"] == "matmul_bf16" and row["status"] == "ok":
        ctx.matmul_gflops = numbers["bf16_matmul_tflops"] * 1000
        ctx.gpu_count = numbers.get("gpu_count", 0)
    if row["check"] == "setup" and row["status"] == "ok":
        ctx.facts["params_m"] = numbers["params_m"]


# ---------------------------------------------------------------------------------------------
# The report


def write_report(report: dict, out: Path) -> None:
    from exemplar.fsio import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(report) + "\n")


def markdown(report: dict) -> str:
    info = report["info"]
    gpu = next((r["numbers"] for r in report["rows"] if r["check"] == "matmul_bf16"), {})
    title = "GPU check" if info["mode"] == "gpu" else "GPU check: CPU dry run (not GPU numbers)"
    lines = [
        f"### {title}",
        "",
        f"- date: {info['date']}; {info.get('elapsed_s', 0):.0f} s of a {info['budget_s']:.0f} s budget",
        f"- machine: {gpu.get('gpu', 'no GPU')}, CUDA {gpu.get('cuda') or info['cuda_build'] or '-'}, "
        f"{info['cpu_cores']} CPU cores, python {info['python']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- exemplar commit {info['exemplar_commit']}; wheels: {info['wheels']}",
        "",
        "| check | status | s | numbers | tolerance / target |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for row in report["rows"]:
        bound = "; ".join(x for x in (row.get("tolerance"), row.get("target")) if x).replace("|", "/")
        status = row["status"].replace("|", "/")
        lines.append(
            f"| {row['check']} | {status} | {row['seconds']:.1f} | {_numbers(row['numbers'])} | {bound} |"
        )
    return "\n".join(lines)


def _numbers(numbers: dict) -> str:
    def show(value) -> str:
        if isinstance(value, bool) or not isinstance(value, float):
            return str(value).replace("|", "/")
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"

    return ", ".join(f"{k} {show(v)}" for k, v in numbers.items() if k != "generated") or "-"


if __name__ == "__main__":
    main()
