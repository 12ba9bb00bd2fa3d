"""The checks behind bench/gpu_check.py: each one function that returns its row's numbers.

A check returns a dict with "status" ("ok", "failed: why", "skipped: why") and "numbers"
(what it measured), and may add "tolerance" (what was compared, and how close it had to be) and
"target" (the benchmark's goals). An exception is the orchestrator's to report as `failed`.
Every check goes through the library's public entry points: `exemplar.config.load_config`,
`exemplar.train.finetune.finetune`, the `exemplar train` CLI under torchrun, the loss module and
collators of the training loop, and bench/run.py's side-by-side runs for the TRL comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

# Sizes per mode: the GPU run (a few dozen steps of a Qwen2.5-0.5B-shaped model at length 2048) and
# the CPU dry run (the same code with a tiny model, so every line runs on a laptop in seconds).
SIZES = {
    "gpu": dict(
        steps=30,
        bench_steps=20,
        small_layers=4,  # the models of the exactness and torchrun checks: 0.5B's shape, 4 layers
        accum_length=2048,
        torchrun_length=1024,
        exact_docs=[700, 300, 900, 100],
        exact_precision="bf16",
        exact_max_abs=0.1,  # nats: per-token CE, packed vs alone, bf16 autocast (other kernels: rounding)
        accum_precision="bf16",
        accum_rel=5e-3,  # step-1 loss and grad norm, relative, bf16 autocast
        min_ratio=1.5,
        min_mfu=0.45,
    ),
    "tiny": dict(
        steps=6,
        bench_steps=3,
        small_layers=2,
        accum_length=64,
        torchrun_length=64,
        exact_docs=[20, 9, 25, 6],
        exact_precision="fp32",
        exact_max_abs=1e-4,
        accum_precision="fp32",
        accum_rel=1e-5,
        min_ratio=1.5,
        min_mfu=0.45,
    ),
}


@dataclass
class Context:
    """What every check may read: set by the orchestrator before each check's process starts."""

    dry_run: bool
    workdir: Path
    sizes: dict[str, Any]
    preset: str = "gpu"  # bench/common's workload (re-applied in each check's process)
    matmul_gflops: float | None = None  # bf16, from the matmul_bf16 check
    gpu_count: int = 0
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return not self.dry_run

    @property
    def bench_dir(self) -> Path:
        return self.workdir / "bench"


def needs_cuda(ctx: Context, why: str = "needs CUDA") -> dict | None:
    return {"status": f"skipped: {why}", "numbers": {}} if not ctx.cuda else None


# ---------------------------------------------------------------------------------------------
# Configs


def small_architecture(ctx: Context) -> dict[str, Any]:
    """The workload's architecture with fewer layers, as a config mapping."""
    return {"model_type": common.MODEL_TYPE, **common.MODEL, "num_hidden_layers": ctx.sizes["small_layers"]}


def small_model(ctx: Context) -> dict[str, Any]:
    """config.model for a random init of `small_architecture`."""
    return {"from_config": small_architecture(ctx)}


def raw_config(ctx: Context, out: str, *, model: dict, max_length: int | None = None, **train: Any) -> dict:
    """A config mapping (what a user's YAML holds) for the workload's data and tokenizer."""
    bench = ctx.bench_dir
    return {
        "model": model,
        "tokenizer": str(bench / "tokenizer"),
        "data": {
            "train": [{"path": str(bench / "train.json"), "format": "alpaca"}],
            "cache_dir": str(ctx.workdir / "cache"),
            "num_proc": 1,  # no worker pool: a few thousand short rows tokenize in seconds
        },
        "max_length": max_length or common.MAX_LENGTH,
        "packing": True,
        "train": {
            "micro_batch_size": common.SEQS_PER_STEP,
            "grad_accum": 1,
            "lr": common.LR,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "precision": "bf16",
            "seed": common.SEED,
            **train,
        },
        "output_dir": str(ctx.workdir / "runs" / out),
    }


def pretrained(ctx: Context) -> dict[str, Any]:
    return {"path": str(ctx.bench_dir / "model")}


def step_losses(output_dir: str | Path) -> list[float]:
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]


def loss_numbers(losses: list[float]) -> dict[str, Any]:
    """First and last step loss, and whether the mean of the last third fell below the first third."""
    k = max(1, len(losses) // 3)
    head, tail = losses[:k], losses[-k:]
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_decreased": sum(tail) / len(tail) < sum(head) / len(head),
    }


def memory_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    out = {"peak_rss_gb": summary["peak_rss_mb"] / 1024}
    if "peak_gpu_mem_mb" in summary:
        out["peak_gpu_gb"] = summary["peak_gpu_mem_mb"] / 1024
    return out


# ---------------------------------------------------------------------------------------------
# The machine and the workload


def matmul_bf16(ctx: Context) -> dict:
    import torch

    numbers: dict[str, Any] = {"bf16_matmul_tflops": common.matmul_rate("bf16") / 1000}
    if ctx.cuda:
        numbers["gpu"] = torch.cuda.get_device_name(0)
        numbers["gpu_count"] = torch.cuda.device_count()
        numbers["cuda"] = torch.version.cuda
    return {"status": "ok", "numbers": numbers, "tolerance": "size 8192^3 on GPU, 2048^3 on CPU; best of 5"}


def setup(ctx: Context) -> dict:
    """The shared workload (bench/common.prepare_workdir): random-init model, tokenizer, rows."""
    info = common.prepare_workdir(ctx.bench_dir, 0)
    return {"status": "ok", "numbers": {"params_m": info["params"] / 1e6, "rows": info["train_rows"]}}


# ---------------------------------------------------------------------------------------------
# Fine-tuning through finetune(config)


def _finetune(ctx: Context, out: str, method: str, merge: bool) -> dict:
    from exemplar.config import load_config
    from exemplar.train.finetune import finetune

    train = {"method": method, "max_steps": ctx.sizes["steps"], "merge": merge}
    config = load_config(None, **raw_config(ctx, out, model=pretrained(ctx), **train))
    summary = finetune(config, progress=False)
    losses = step_losses(config.output_dir)
    numbers = {
        **loss_numbers(losses),
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        **memory_numbers(summary),
    }
    if ctx.matmul_gflops:
        # 6 x parameters x tokens (no attention term): the usual model-FLOPs estimate
        params = ctx.facts.get("params_m", 0) * 1e6
        numbers["mfu_6n"] = 6 * params * summary["tokens_per_s"] / (ctx.matmul_gflops * 1e9)
    numbers.update(reload_and_generate(summary["outputs"]["model"], ctx))
    status = "ok"
    if not numbers["loss_decreased"]:
        status = "failed: the loss did not decrease"
    elif numbers["generated_tokens"] == 0:
        status = "failed: the reloaded model generated nothing"
    return {"status": status, "numbers": numbers, "summary": summary}


def reload_and_generate(model_dir: str, ctx: Context) -> dict[str, Any]:
    """Load the exported folder with plain transformers and greedily generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if ctx.cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if ctx.cuda else None)
    model.to(device).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count from 41 to 47."}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return {
        "generated_tokens": int(new.numel()),
        "generated": tokenizer.decode(new, skip_special_tokens=True),
    }


def full_bf16(ctx: Context) -> dict:
    return _finetune(ctx, "full", "full", merge=False)


def lora_bf16(ctx: Context) -> dict:
    return _finetune(ctx, "lora", "lora", merge=True)


def qlora_nf4(ctx: Context) -> dict:
    if skipped := needs_cuda(ctx, "needs CUDA (bitsandbytes 4-bit)"):
        return skipped
    result = _finetune(ctx, "qlora", "qlora", merge=True)
    result["numbers"]["linear4bit_modules"] = _count_4bit(ctx)
    if not result["numbers"]["linear4bit_modules"]:
        result["status"] = "failed: the QLoRA model has no 4-bit layers"
    return result


def _count_4bit(ctx: Context) -> int:
    """How many bitsandbytes 4-bit linear layers exemplar's loader puts in a QLoRA model."""
    from exemplar.config import load_config
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.model.loading import load_model

    config = load_config(None, **raw_config(ctx, "qlora-count", model=pretrained(ctx), method="qlora"))
    model = load_model(
        config.model, config.train, load_tokenizer(config).tokenizer, resolve=config.resolve_path
    )
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


# ---------------------------------------------------------------------------------------------
# The benchmark against TRL (bench/run.py's machinery, the gpu preset)


def _versus_trl(ctx: Context, method: str) -> dict:
    import run

    rates = {"bf16": ctx.matmul_gflops or common.matmul_rate("bf16")}
    runs = run.train_pair(
        ["exemplar", "trl"], ctx.bench_dir, ctx.sizes["bench_steps"], "bf16", method, common.PRESET
    )
    rows = {r["tool"]: r for r in run.train_rows(runs, rates)}
    ours, theirs = rows["exemplar"], rows["trl"]
    numbers: dict[str, Any] = {
        "exemplar_tokens_per_s": ours["tokens_per_s"],
        "trl_tokens_per_s": theirs["tokens_per_s"],
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "exemplar_mfu": ours["mfu"],
        "trl_mfu": theirs["mfu"],
        "exemplar_loss_last": ours["loss"],
        "trl_loss_last": theirs["loss"],
    }
    for tool, row in rows.items():
        if "peak_gpu_gb" in row:
            numbers[f"{tool}_peak_gpu_gb"] = row["peak_gpu_gb"]
    met = numbers["speedup"] >= ctx.sizes["min_ratio"] and ours["mfu"] >= ctx.sizes["min_mfu"]
    target = f"{ctx.sizes['min_ratio']}x TRL and MFU >= {ctx.sizes['min_mfu']:.0%}: " + (
        "met" if met else "missed"
    )
    return {"status": "ok", "numbers": numbers, "target": target, "runs": runs}


def trl_full(ctx: Context) -> dict:
    return _versus_trl(ctx, "full")


def trl_lora(ctx: Context) -> dict:
    return _versus_trl(ctx, "lora")


# ---------------------------------------------------------------------------------------------
# Exactness


def _packed_exactness(ctx: Context, attn: str) -> dict:
    """Per-token losses of documents packed in one row vs each document alone (and padded together).

    The control runs the packed row as one document (plain causal attention across documents):
    what cross-talk would look like. It must differ far more than the packed row does, or the
    tolerance could not tell a leak from rounding.
    """
    import torch

    from exemplar.config import ModelConfig, TrainConfig
    from exemplar.data.tokenizer import load_tokenizer
    from exemplar.model.loading import load_model
    from exemplar.train.attention import needs_flat_batches
    from exemplar.train.batch import collate_packed, collate_padded, flatten_batch
    from exemplar.train.loop import autocast_factory
    from exemplar.train.loss import LMLoss

    precision = ctx.sizes["exact_precision"]
    config = _config(ctx, "exact", model=small_model(ctx))
    tokenizer = load_tokenizer(config).tokenizer
    # a wider init than the default 0.02 makes attention sharp, so a leak would move the losses
    model_cfg = ModelConfig(
        from_config={**small_architecture(ctx), "initializer_range": 0.1}, attn_implementation=attn
    )
    model = load_model(model_cfg, TrainConfig(method="full", precision=precision), tokenizer).eval()
    device = next(model.parameters()).device
    loss_fn = LMLoss(model)
    autocast = autocast_factory(precision, device)
    generator = torch.Generator().manual_seed(0)
    docs = []
    for n in ctx.sizes["exact_docs"]:
        ids = torch.randint(10, len(tokenizer), (n,), generator=generator).tolist()
        docs.append((ids, ids))
    pad = tokenizer.pad_token_id or 0
    flat = needs_flat_batches(model)

    def per_token(batch) -> torch.Tensor:
        batch = (flatten_batch(batch) if flat and batch.attention_mask is None else batch).to(device)
        with torch.no_grad(), autocast():
            return loss_fn(batch, reduction="none").loss_sum.float().cpu()

    alone = torch.cat([per_token(collate_padded([d], pad)) for d in docs])
    packed_batch = collate_packed([docs], pad)
    packed = per_token(packed_batch)
    padded = per_token(collate_padded(docs, pad))
    leak = collate_packed([docs], pad)
    leak.position_ids = torch.arange(leak.input_ids.shape[1])[None].clone()
    leak.doc_lengths = None  # one document: every token sees the earlier documents
    leaked = per_token(leak)
    tol = ctx.sizes["exact_max_abs"]
    numbers = {
        "attention": getattr(model.config, "_attn_implementation", attn),
        "tokens": int(alone.numel()),
        "packed_max_abs": float((packed - alone).abs().max()),
        "padded_max_abs": float((padded - alone).abs().max()),
        "cross_talk_control_max_abs": float((leaked - alone).abs().max()),
    }
    ok = numbers["packed_max_abs"] <= tol and numbers["padded_max_abs"] <= tol
    telling = numbers["cross_talk_control_max_abs"] > 10 * max(numbers["packed_max_abs"], tol / 10)
    status = (
        "ok"
        if ok and telling
        else ("failed: the control does not show cross-talk" if ok else "failed: differs")
    )
    tolerance = f"per-token CE, max abs diff <= {tol:g} nats ({precision}); control > 10x that"
    return {"status": status, "numbers": numbers, "tolerance": tolerance}


def packed_exactness_sdpa(ctx: Context) -> dict:
    return _packed_exactness(ctx, "sdpa")


def packed_exactness_flex_attention(ctx: Context) -> dict:
    if skipped := needs_cuda(ctx, "needs CUDA (flex attention compiles for the GPU)"):
        return skipped
    return _packed_exactness(ctx, "flex_attention")


def packed_exactness_flash_attention_2(ctx: Context) -> dict:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return {"status": "skipped: flash_attn is not installed in this image", "numbers": {}}
    if skipped := needs_cuda(ctx):
        return skipped
    return _packed_exactness(ctx, "flash_attention_2")


def accumulation_invariance(ctx: Context) -> dict:
    """The same global batch as micro-batch x accumulation = 4x1, 2x2, 1x4: the same step losses."""
    from exemplar.train.finetune import finetune

    precision = ctx.sizes["accum_precision"]
    losses, norms = {}, {}
    for mbs, accum in [(4, 1), (2, 2), (1, 4)]:
        config = _config(
            ctx,
            f"accum-{mbs}x{accum}",
            model=small_model(ctx),
            max_length=ctx.sizes["accum_length"],
            micro_batch_size=mbs,
            grad_accum=accum,
            max_steps=3,
            precision=precision,
        )
        finetune(config, progress=False)
        rows = [
            json.loads(line) for line in Path(config.output_dir, "metrics.jsonl").read_text().splitlines()
        ]
        losses[f"{mbs}x{accum}"] = [r["loss"] for r in rows]
        norms[f"{mbs}x{accum}"] = rows[0]["grad_norm"]
    ref_loss, ref_norm = losses["4x1"][0], norms["4x1"]
    loss_rel = max(abs(v[0] - ref_loss) / abs(ref_loss) for v in losses.values())
    norm_rel = max(abs(v - ref_norm) / abs(ref_norm) for v in norms.values())
    last_rel = max(abs(v[-1] - losses["4x1"][-1]) / abs(losses["4x1"][-1]) for v in losses.values())
    tol = ctx.sizes["accum_rel"]
    numbers = {
        "step1_loss": ref_loss,
        "step1_loss_max_rel": loss_rel,
        "step1_grad_norm_max_rel": norm_rel,
        "step3_loss_max_rel": last_rel,
    }
    status = "ok" if loss_rel <= tol and norm_rel <= 4 * tol else "failed: differs"
    tolerance = f"step-1 loss rel <= {tol:g}, grad norm rel <= {4 * tol:g} ({precision})"
    return {"status": status, "numbers": numbers, "tolerance": tolerance}


def _config(ctx: Context, out: str, **kwargs: Any):
    from exemplar.config import load_config

    return load_config(None, **raw_config(ctx, out, **kwargs))


def fused_adamw(ctx: Context) -> dict:
    """exemplar's optimizer on a CUDA model is torch's fused AdamW, and a step runs."""
    if skipped := needs_cuda(ctx, "needs CUDA (fused AdamW is chosen on CUDA only)"):
        return skipped
    import torch

    from exemplar.config import TrainConfig
    from exemplar.train.schedule import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).cuda()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    before = model[0].weight.detach().clone()
    model(torch.randn(8, 64, device="cuda")).square().mean().backward()
    optimizer.step()
    moved = float((model[0].weight - before).abs().max())
    fused = bool(optimizer.defaults.get("fused"))
    status = "ok" if fused and moved > 0 else "failed: not fused" if not fused else "failed: no update"
    return {"status": status, "numbers": {"fused": fused, "max_update": moved}}


# ---------------------------------------------------------------------------------------------
# torchrun: the CLI under torch.distributed.run


def _torchrun(ctx: Context, out: str, strategy: str, *, method: str = "full", offload: bool = False) -> dict:
    """`torchrun --nproc_per_node N -m exemplar train CONFIG`: N is the GPU count (2 Gloo ranks on CPU)."""
    import yaml

    ranks = ctx.gpu_count if ctx.cuda else 2
    if ranks < 2 and out != "torchrun_fsdp2":
        reason = (
            f"not run: {ranks} GPU; exemplar trains a single rank as one process (see torchrun_fsdp2), "
            f"so {strategy} over NCCL needs 2+ GPUs"
        )
        return {"status": f"failed: {reason}", "numbers": {}}
    model = pretrained(ctx) if method == "qlora" else small_model(ctx)
    train = {"method": method, "distributed": strategy, "cpu_offload_optimizer": offload, "max_steps": 4}
    train |= {"micro_batch_size": 2, "grad_accum": 2}
    raw = raw_config(ctx, out, model=model, max_length=ctx.sizes["torchrun_length"], **train)
    path = ctx.workdir / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += ["-m", "exemplar", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": f"failed: exit {proc.returncode}: {rank_error(proc.stderr)}", "numbers": {}}
    summary = json.loads(Path(raw["output_dir"], "train_summary.json").read_text())
    numbers = {
        "ranks": ranks,
        **loss_numbers(step_losses(raw["output_dir"])),
        "tokens_per_s": summary["tokens_per_s"],
        **memory_numbers(summary),
        "strategy": summary.get("distributed", "none (one process)"),
    }
    if summary.get("distributed") != strategy:
        reason = (
            f"torchrun with {ranks} rank trained, but exemplar runs one rank as a single process "
            f"(no process group): {strategy}/NCCL not exercised; needs 2+ GPUs"
        )
        return {"status": f"failed: {reason}", "numbers": numbers}
    return {"status": "ok", "numbers": numbers}


def rank_error(stderr: str) -> str:
    """What the ranks said went wrong (`rank N: error: ...` and the lines under it), else the tail."""
    lines = stderr.strip().splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("rank ") and ": error" in line), None)
    picked = lines[at : at + 4] if at is not None else lines[-3:]
    return " / ".join(line.strip() for line in picked)[:400]


def torchrun_fsdp2(ctx: Context) -> dict:
    return _torchrun(ctx, "torchrun_fsdp2", "fsdp2")


def torchrun_ddp(ctx: Context) -> dict:
    return _torchrun(ctx, "torchrun_ddp", "ddp")


def fsdp2_cpu_offload(ctx: Context) -> dict:
    if skipped := needs_cuda(ctx, "needs CUDA (FSDP2's CPUOffloadPolicy applies to GPU training)"):
        return skipped
    return _torchrun(ctx, "fsdp2_cpu_offload", "fsdp2", offload=True)


def qlora_torchrun_ddp(ctx: Context) -> dict:
    if skipped := needs_cuda(ctx, "needs CUDA (bitsandbytes 4-bit)"):
        return skipped
    return _torchrun(ctx, "qlora_torchrun_ddp", "ddp", method="qlora")


def qlora_torchrun_fsdp2(ctx: Context) -> dict:
    if skipped := needs_cuda(ctx, "needs CUDA (bitsandbytes 4-bit)"):
        return skipped
    return _torchrun(ctx, "qlora_torchrun_fsdp2", "fsdp2", method="qlora")
