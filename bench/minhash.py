"""MinHash near-duplicate removal: `exemplar curate dedup --method minhash` against a direct
`datasketch` script doing the same work, on rows with injected duplicates (bench/minhash_data.py).

    python bench/minhash.py --rows 100000 1000000 [--num-proc 1 2] [--markdown FILE] [--json FILE]

The same work on both sides: read the JSONL file, compare user + assistant text normalised
(NFKC, case folded, whitespace collapsed), character 5-gram shingles, MinHash with 128
permutations (same seed and hash scheme), MinHashLSH with the same bands and rows, a candidate
verified by its estimated Jaccard >= the threshold, the first row in input order kept, kept and
removed rows written as JSONL. Each run is a child process of its own (peak RSS from wait4, so a
child's worker processes count too); rows/s is rows over the child's wall time, imports included.
Precision and recall are over the injected copies: a removed row is right when it is a copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minhash_data import EXACT, NEAR, ORIGINAL, Truth, compared, make_rows, true_jaccard, write_jsonl  # noqa: E402

THRESHOLD = 0.8


# ---- the direct datasketch side (runs in a child) ----------------------------------------------


def direct_datasketch(data: Path, out: Path, threshold: float) -> None:
    """What a user would write with datasketch alone, with the parameters exemplar uses, and
    datasketch's own shingle hash (its default: SHA-1 of each shingle's bytes)."""
    import unicodedata
    from itertools import islice

    from datasketch import LeanMinHash, MinHash, MinHashLSH

    from exemplar.curate.dedup import FALSE_NEGATIVE_WEIGHT, NUM_PERM, SCHEME, SEED, SHINGLE

    def shingles(text: str) -> list[bytes]:
        text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
        if len(text) <= SHINGLE:
            return [text.encode()]
        return list({text[i : i + SHINGLE].encode() for i in range(len(text) - SHINGLE + 1)})

    lsh = MinHashLSH(threshold, NUM_PERM, weights=(1 - FALSE_NEGATIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT))
    kept_values: dict[int, np.ndarray] = {}
    out.mkdir(parents=True, exist_ok=True)
    with (
        data.open(encoding="utf-8") as lines,
        (out / "kept.jsonl").open("w") as kept,
        (out / "removed.jsonl").open("w") as removed,
    ):
        index = 0
        while chunk := [json.loads(line) for line in islice(lines, 256)]:
            texts = ["\n".join(m["content"] for m in row["messages"]) for row in chunk]
            hashes = MinHash.bulk([shingles(t) for t in texts], num_perm=NUM_PERM, seed=SEED, scheme=SCHEME)
            for row, m in zip(chunk, hashes, strict=True):
                match = next(
                    (k for k in sorted(lsh.query(m)) if np.mean(kept_values[k] == m.hashvalues) >= threshold),
                    None,
                )
                if match is None:
                    lsh.insert(index, LeanMinHash(m), check_duplication=False)
                    kept_values[index] = m.hashvalues
                    kept.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    row["meta"] = {"row": index + 1, "duplicate_of": {"row": match + 1}}
                    removed.write(json.dumps(row, ensure_ascii=False) + "\n")
                index += 1


def run_exemplar(data: Path, out: Path, threshold: float, num_proc: int) -> None:
    from exemplar.cli import main

    argv = ["curate", "dedup", str(data), "--out", str(out), "--method", "minhash"]
    argv += ["--threshold", str(threshold), "--num-proc", str(num_proc), "--no-progress"]
    if main(argv) != 0:
        raise SystemExit("exemplar curate dedup failed")


def child_main(args: argparse.Namespace) -> None:
    if args.child == "exemplar":
        run_exemplar(args.data, args.out, args.threshold, args.num_proc)
    else:
        direct_datasketch(args.data, args.out, args.threshold)


# ---- the parent: data, children, scoring, tables ------------------------------------------------


def run_child(tool: str, data: Path, out: Path, threshold: float, num_proc: int) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--data", str(data), "--out", str(out)]
    cmd += ["--threshold", str(threshold), "--num-proc", str(num_proc)]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{tool} child failed ({process.returncode}):\n{stderr[-3000:]}")
    return {
        "seconds": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the child and its workers: steadier on a busy machine
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stderr_tail": stderr[-600:],
    }


def removed_rows(out: Path, tool: str) -> dict[int, int]:
    """0-based removed row -> 0-based row it was judged a duplicate of."""
    result = {}
    with (out / "removed.jsonl").open(encoding="utf-8") as f:
        for line in f:
            meta = json.loads(line)["meta"]
            row = meta["source"]["row"] if tool == "exemplar" else meta["row"]
            result[row - 1] = meta["duplicate_of"]["row"] - 1
    return result


def score(removed: dict[int, int], truth: Truth, texts: list[str], threshold: float) -> dict:
    """Precision and recall of the removals against the injected copies, by kind of copy."""
    is_removed = np.zeros(len(truth.kind), dtype=bool)
    is_removed[list(removed)] = True
    copy = truth.kind != ORIGINAL
    near_above = (truth.kind == NEAR) & (truth.jaccard >= threshold)
    near_below = (truth.kind == NEAR) & (truth.jaccard < threshold)

    def root(i: int) -> int:
        return int(truth.copy_of[i]) if truth.copy_of[i] >= 0 else i

    true_positives = int((is_removed & copy).sum())
    right_original = sum(root(r) == root(d) for r, d in removed.items() if copy[r])
    # Originals removed: real near duplicates among the made rows (true Jaccard at the threshold)
    # or MinHash estimate errors.
    wrong = [r for r in removed if not copy[r]]
    real = sum(true_jaccard(texts[r], texts[removed[r]]) >= threshold for r in wrong)
    return {
        "removed": int(is_removed.sum()),
        "precision": true_positives / max(1, int(is_removed.sum())),
        "recall": true_positives / max(1, int(copy.sum())),
        "recall_exact": float(is_removed[truth.kind == EXACT].mean()),
        "recall_near_at_threshold": float(is_removed[near_above].mean()) if near_above.any() else None,
        "found_near_below_threshold": float(is_removed[near_below].mean()) if near_below.any() else None,
        "duplicate_of_right_cluster": right_original / max(1, true_positives),
        "originals_removed": len(wrong),
        "originals_removed_truly_similar": int(real),
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import datasketch

    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "datasketch": datasketch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def made_rows(total: int, work: Path) -> tuple[Path, list[str], Truth]:
    """The data file, its compared texts and truth; made once per size and kept in `work`."""
    data, truth_path = work / f"rows_{total}.jsonl", work / f"truth_{total}.npz"
    if data.is_file() and truth_path.is_file():
        texts = [compared(json.loads(line)) for line in data.open(encoding="utf-8")]
        return data, texts, Truth.load(truth_path)
    start = time.perf_counter()
    rows, truth = make_rows(total)
    write_jsonl(rows, data)
    truth.save(truth_path)
    print(f"[minhash] {total:,} rows made in {time.perf_counter() - start:.0f} s: {data}", file=sys.stderr)
    return data, [compared(row) for row in rows], truth


def bench_size(
    total: int, work: Path, tools: list[str], num_procs: list[int], threshold: float
) -> list[dict]:
    data, texts, truth = made_rows(total, work)
    results = []
    runs = [("datasketch", 1)] * ("datasketch" in tools) + [("exemplar", n) for n in num_procs] * (
        "exemplar" in tools
    )
    for tool, n in runs:
        out = work / f"out_{total}_{tool}_{n}"
        result = run_child(tool, data, out, threshold, n)
        result.update(tool=tool, processes=n, rows=total, rows_per_s=total / result["seconds"])
        result["rows_per_cpu_s"] = total / result["cpu_s"]
        result.update(score(removed_rows(out, tool), truth, texts, threshold))
        print(f"[minhash] {json.dumps(result)}", file=sys.stderr)
        results.append(result)
    return results


def table(results: list[dict]) -> str:
    head = (
        "| rows | tool | processes | seconds | rows/s | CPU s | rows/CPU s | peak RSS (MB) | removed "
        "| precision | recall | recall, exact copies | recall, near copies at J >= t "
        "| near copies below t found | duplicate_of in the right cluster |\n"
        + "| ---: | --- "
        + "| ---: " * 13
        + "|"
    )
    lines = [head]
    for r in results:
        near_below = r["found_near_below_threshold"]
        lines.append(
            f"| {r['rows']:,} | {r['tool']} | {r['processes']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} "
            f"| {r['cpu_s']:.1f} | {r['rows_per_cpu_s']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['removed']:,} "
            f"| {r['precision']:.4f} | {r['recall']:.4f} | {r['recall_exact']:.4f} "
            f"| {r['recall_near_at_threshold']:.4f} | {'-' if near_below is None else f'{near_below:.4f}'} "
            f"| {r['duplicate_of_right_cluster']:.4f} |"
        )
    for total in sorted({r["rows"] for r in results}):
        base = next((r for r in results if r["rows"] == total and r["tool"] == "datasketch"), None)
        for r in results:
            if base is not None and r["rows"] == total and r["tool"] == "exemplar":
                lines.append(
                    f"| {total:,} | **exemplar / datasketch** | {r['processes']} | "
                    f"| **{r['rows_per_s'] / base['rows_per_s']:.2f}x** | "
                    f"| **{r['rows_per_cpu_s'] / base['rows_per_cpu_s']:.2f}x** "
                    f"| **{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x** |" + " |" * 7
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1], help="exemplar's worker processes")
    parser.add_argument(
        "--tools", nargs="+", choices=["datasketch", "exemplar"], default=["datasketch", "exemplar"]
    )
    parser.add_argument(
        "--from-json", type=Path, nargs="+", default=None, help="only print the table of earlier --json files"
    )
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--work", type=Path, default=Path("/tmp/exemplar-minhash-bench"))
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=["exemplar", "datasketch"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(argparse.Namespace(**{**vars(args), "num_proc": args.num_proc[0]}))
        return
    info = machine()
    if args.from_json:
        runs = [json.loads(p.read_text()) for p in args.from_json]
        info, results = runs[0]["machine"], [r for run in runs for r in run["results"]]
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        results = []
        for n in args.rows:
            results += bench_size(n, args.work, args.tools, args.num_proc, args.threshold)
            if args.json:  # after each size: a long run stopped later keeps what it measured
                args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    from exemplar.curate.dedup import lsh_parameters

    b, r, p = lsh_parameters(args.threshold)
    text = (
        f"- machine: {info['cpu']}, nproc {info['nproc']}, 1-minute load average at the start "
        f"{info['load_average_1m']:.2f}; python {info['python']}, datasketch {info['datasketch']}\n"
        f"- date: {info['date_utc']}\n- threshold {args.threshold:g}: {b} bands x {r} rows, a pair at "
        f"the threshold becomes a candidate with probability {p:.3f}\n\n" + table(results)
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
