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
ASSET_TOKENIZER = REPO / "exemplar" / "assets" / "tokenizer"

# Other workloads (`--preset`), self-contained so that they run where the reference data is absent
# (the GPU machine): the project's own tokenizer and generated counting chats (`synthetic_rows`).
# `gpu` is a Qwen2.5-0.5B-shaped model at max length 2048; `tiny` is its CPU dry run.
PRESET = "cpu"
DEVICE = "cpu"
MODEL_TYPE = "llama"
DATA_MAX_NUMBERS = 0  # synthetic rows: the longest count (about 4 tokens a number)
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY_QWEN = dict(
    vocab_size=3072,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(
        MODEL=QWEN25_05B,
        MODEL_TYPE="qwen2",
        MAX_LENGTH=2048,
        SEQS_PER_STEP=8,
        LR=2e-4,
        DEVICE="cuda",
        DATA_MAX_NUMBERS=400,
    ),
    "tiny": dict(
        MODEL=TINY_QWEN,
        MODEL_TYPE="qwen2",
        MAX_LENGTH=64,
        SEQS_PER_STEP=2,
        LR=1e-3,
        DEVICE="cpu",
        DATA_MAX_NUMBERS=9,
    ),
}


def apply_preset(name: str) -> None:
    """Switch this module's workload constants to a preset ('cpu' is the reference workload)."""
    global PRESET
    if name != "cpu":
        globals().update(PRESETS[name])
    PRESET = name


def synthetic_rows(count: int, max_numbers: int, seed: int = SEED) -> list[dict[str, str]]:
    """Alpaca-style rows asking to count up or down over a random range: learnable in a few steps
    (the loss visibly falls) and of varied lengths (2 to `max_numbers` numbers), so packing has
    documents of every size to fit. Generated, so no third-party text is needed."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = rng.randint(2, max_numbers)
        first = rng.randint(0, 9999 - n)
        last = first + n - 1
        if rng.random() < 0.5:
            instruction, numbers = f"Count from {first} to {last}.", range(first, last + 1)
        else:
            instruction, numbers = f"Count down from {last} to {first}.", range(last, first - 1, -1)
        rows.append({"instruction": instruction, "input": "", "output": " ".join(map(str, numbers))})
    return rows


def side_parser() -> argparse.ArgumentParser:
    """The command line both sides share: `train|prep WORKDIR [--steps] [--precision] [--num-proc]`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["train", "prep"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--preset", choices=["cpu", *PRESETS], default="cpu")
    return parser


def parse_side_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    apply_preset(args.preset)
    return args


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def peak_gpu() -> dict[str, float]:
    """{"peak_gpu_mb": torch.cuda.max_memory_allocated} on a GPU preset; nothing on the CPU."""
    if DEVICE != "cuda":
        return {}
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


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
    """Write model/, tokenizer/, train.json (Alpaca, or synthetic rows for the self-contained
    presets) and prep.json (the rows repeated) into workdir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from exemplar.data.templates import builtin_template

    workdir.mkdir(parents=True, exist_ok=True)
    synthetic = PRESET != "cpu"
    tok = AutoTokenizer.from_pretrained(str(ASSET_TOKENIZER if synthetic else LLAMA2_TOKENIZER))
    tok.add_special_tokens({"extra_special_tokens": CHATML_TOKENS}, replace_extra_special_tokens=False)
    if not synthetic:
        tok.pad_token = tok.unk_token  # neither side masks by pad id; keep it apart from EOS anyway
    tok.chat_template = builtin_template("chatml").source
    tok.save_pretrained(str(workdir / "tokenizer"))

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    if synthetic:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(MODEL_TYPE, **MODEL, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(**MODEL, **ids))
    model.save_pretrained(str(workdir / "model"))
    params = sum(p.numel() for p in model.parameters())
    del model

    rows = synthetic_rows(4000 if PRESET == "gpu" else 200, DATA_MAX_NUMBERS) if synthetic else alpaca_rows()
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


def matmul_rate(dtype: str, size: int | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a size^3 matmul on all cores, or on the GPU of a GPU preset
    (8192^3 there, each timed product synchronized)."""
    import torch

    device = torch.device(DEVICE)
    size = size or (8192 if device.type == "cuda" else 2048)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    for _ in range(3 if device.type == "cuda" else 1):  # warm up
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
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
