"""The shared workload of the benchmark: model, tokenizer, data, and the numbers both tools report.

Everything both tools load is written once into a work folder by `prepare_workdir`, so the two
sides start from the same bytes: the same initial weights (a seeded random init saved with
`save_pretrained`), the same tokenizer (Llama 2 plus the ChatML tokens, with Exemplar's `chatml`
template as its chat template) and the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXEMPLAR_SHARED_DATA") or REPO.parent / "shared" / "data")
ALPACA = SHARED / "alpaca_en_demo.json"
LLAMA2_TOKENIZER = SHARED / "llama2-tokenizer"

# The reference workload (see BENCHMARKS.md).
MODEL = dict(
    vocab_size=32064,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
MAX_LENGTH = 512
SEQS_PER_STEP = 8
LR = 5e-4
SEED = 0
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def side_parser() -> argparse.ArgumentParser:
    """The command line both sides share: `train|prep WORKDIR [--steps] [--precision] [--num-proc]`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["train", "prep"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--num-proc", type=int, default=1)
    return parser


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def alpaca_rows() -> list[dict[str, str]]:
    return json.loads(ALPACA.read_text(encoding="utf-8"))


def prompt_completion(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """An Alpaca row as the single-turn chat both tools train on, exactly as Exemplar's `alpaca`
    format converts it: user = instruction (+ "\n\n" + input), assistant = output."""
    instruction, extra = row["instruction"], row.get("input") or ""
    extra = extra if extra.strip() else ""
    prompt = f"{instruction}\n\n{extra}" if extra and instruction else (instruction or extra)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


def prepare_workdir(workdir: Path, data_rows: int) -> dict[str, Any]:
    """Write model/, tokenizer/, train.json (Alpaca) and prep.json (Alpaca repeated) into workdir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from exemplar.data.templates import builtin_template

    workdir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(LLAMA2_TOKENIZER))
    tok.add_special_tokens({"extra_special_tokens": CHATML_TOKENS}, replace_extra_special_tokens=False)
    tok.pad_token = tok.unk_token  # neither side masks by pad id; keep it apart from EOS anyway
    tok.chat_template = builtin_template("chatml").source
    tok.save_pretrained(str(workdir / "tokenizer"))

    config = LlamaConfig(
        **MODEL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(workdir / "model"))
    params = sum(p.numel() for p in model.parameters())
    del model

    rows = alpaca_rows()
    (workdir / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    repeats = -(-data_rows // len(rows))
    prep = (rows * repeats)[: max(data_rows, len(rows))] if data_rows else rows
    (workdir / "prep.json").write_text(json.dumps(prep), encoding="utf-8")
    return {"params": params, "tokenizer_size": len(tok), "train_rows": len(rows), "prep_rows": len(prep)}


# ---------------------------------------------------------------------------------------------
# FLOPs and the matmul ceiling


def matmul_params() -> tuple[int, int]:
    """(matmul parameters of the decoder body, of the output layer)."""
    d, i, layers, v = (
        MODEL["hidden_size"],
        MODEL["intermediate_size"],
        MODEL["num_hidden_layers"],
        MODEL["vocab_size"],
    )
    heads, kv = MODEL["num_attention_heads"], MODEL["num_key_value_heads"]
    head_dim = d // heads
    attn = d * d * 2 + 2 * d * kv * head_dim  # q, o and k, v
    return layers * (attn + 3 * d * i), d * v


def step_flops(tokens: int, trained: int, doc_sq_sum: int) -> float:
    """Training FLOPs (forward + backward) of the useful work in a step.

    6 x body matmul parameters x every position, 6 x output-layer parameters x trained positions,
    plus causal attention inside each document: QK^T and AV, 2 x 2 x n^2 x d per layer forward for a
    full square, half of it causal, times 3 for forward + backward.
    """
    body, head = matmul_params()
    attention = 6 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * doc_sq_sum
    return 6.0 * body * tokens + 6.0 * head * trained + attention


def matmul_rate(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a size^3 matmul on all cores."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem, 1),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "datasets", "tokenizers", "exemplar-sft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def cpu_idle(seconds: float = 2.0) -> float:
    """Fraction of all cores' time spent idle over the next `seconds` (1.0 = nothing else runs)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_quiet(max_wait_s: float, idle_at_least: float = 0.9) -> float:
    """Wait (up to max_wait_s) until the machine is idle, so timings are not shared with other work.

    Returns the idle fraction measured last."""
    deadline = time.monotonic() + max_wait_s
    while True:
        idle = cpu_idle()
        if idle >= idle_at_least or time.monotonic() >= deadline or idle != idle:
            return idle
        log(f"machine busy ({1 - idle:.0%} of the cores in use by other work); waiting")
        time.sleep(5)


def emit(result: dict[str, Any]) -> None:
    """Children print one JSON line that the parent picks up."""
    print("BENCH_RESULT " + json.dumps(result), flush=True)
