"""bench/gpu_check.py, the one prepared GPU run: its CPU dry run end to end, and how a check that
fails, crashes or overruns becomes its row while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_checks  # noqa: E402

NAMES = gpu_check.NAMES
# What needs CUDA (or a package the CPU image lacks) is skipped in the dry run; everything else runs.
SKIPPED_ON_CPU = {
    "qlora_nf4",
    "fused_adamw",
    "fsdp2_cpu_offload",
    "qlora_torchrun_ddp",
    "qlora_torchrun_fsdp2",
    "packed_exactness_flex_attention",
    "packed_exactness_flash_attention_2",
}


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("torch").backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"),
    reason="the CPU dry run's bf16 rows are capped for a CPU with AVX-512; on an AVX2-only CPU bf16 "
    "matmuls are emulated and matmul_bf16 overruns its 30 s cap",
)
def test_the_cpu_dry_run_writes_every_row_and_the_cpu_rows_pass(tmp_path):
    pytest.importorskip("trl", reason="the dry run's TRL rows need trl: pip install -e '.[bench]'")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    command = [sys.executable, str(BENCH / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    rows = {row["check"]: row for row in report["rows"]}
    assert list(rows) == NAMES
    for name, row in rows.items():
        if name in SKIPPED_ON_CPU:
            assert row["status"].startswith("skipped: "), (name, row)
        else:
            assert row["status"] == "ok", (name, row.get("status"), row.get("error"))
    assert rows["full_bf16"]["numbers"]["loss_decreased"] is True
    assert rows["lora_bf16"]["numbers"]["generated_tokens"] > 0
    assert rows["torchrun_fsdp2"]["numbers"]["strategy"] == "fsdp2"
    assert rows["torchrun_ddp"]["numbers"]["strategy"] == "ddp"
    assert rows["trl_full"]["numbers"]["trl_tokens_per_s"] > 0
    assert report["info"]["mode"] == "cpu dry run"
    assert set(gpu_check.VERSIONED) <= set(report["info"]["versions"])

    table = (out / "gpu_check.md").read_text()
    assert "CPU dry run (not GPU numbers)" in table
    for name in NAMES:
        assert f"| {name} | {rows[name]['status']} |" in table


@pytest.fixture
def ctx(tmp_path):
    return gpu_checks.Context(dry_run=True, workdir=tmp_path, sizes=gpu_checks.SIZES["tiny"], preset="tiny")


def _raises(ctx):
    raise ValueError("the reason\nsecond line")


def _dies(ctx):
    os._exit(3)


def _hangs(ctx):
    time.sleep(600)


def _passes(ctx):
    import common

    return {"status": "ok", "numbers": {"x": 1.5, "max_length": common.MAX_LENGTH}, "tolerance": "exact"}


def _row(name, check, ctx, rows=(), cap=30.0, left=60.0):
    return gpu_check.run_one(
        name, check, cap, ("setup",) if rows else (), ctx, list(rows), time.monotonic() + left
    )


def test_a_passing_check_gives_its_numbers(ctx):
    row = _row("a", _passes, ctx)
    assert (row["status"], row["numbers"], row["tolerance"]) == ("ok", {"x": 1.5, "max_length": 64}, "exact")


def test_checks_also_run_in_spawned_processes(ctx, monkeypatch):
    # the fallback when an import initialized CUDA in the parent
    monkeypatch.setattr(gpu_check, "START_METHOD", "spawn")
    row = _row("a", _passes, ctx)
    assert row["status"] == "ok"
    assert row["numbers"]["max_length"] == 64  # the tiny preset, applied in the new interpreter too
    assert _row("a", _raises, ctx)["status"].startswith("failed: ValueError")


def test_an_exception_becomes_a_failed_row_with_its_message_and_traceback(ctx):
    row = _row("a", _raises, ctx)
    assert row["status"] == "failed: ValueError: the reason / second line"
    assert "Traceback" in row["error"]


def test_a_process_that_dies_becomes_a_failed_row(ctx):
    assert _row("a", _dies, ctx)["status"] == "failed: the check's process died (exit code 3)"


def test_a_check_past_its_cap_is_killed_and_failed(ctx):
    row = _row("a", _hangs, ctx, cap=1.0)
    assert row["status"] == "failed: timed out after its cap of 1 s"
    assert row["seconds"] < 30


def test_a_check_stopped_by_the_budget_is_skipped_not_failed(ctx, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0.5)
    left = gpu_check.REPORT_RESERVE_S + 1.5
    row = _row("a", _hangs, ctx, cap=300.0, left=left)
    assert row["status"].startswith("skipped: out of time (stopped after")


def test_no_check_starts_without_time_left_or_after_what_it_needs_failed(ctx):
    assert _row("a", _passes, ctx, left=1.0)["status"] == "skipped: out of time"
    failed_setup = [{"check": "setup", "status": "failed: x"}]
    assert _row("a", _passes, ctx, rows=failed_setup)["status"] == "skipped: needs setup"


def test_the_table_has_a_row_per_check_and_no_stray_column_separators():
    rows = [
        {"check": "a", "status": "failed: x | y", "seconds": 1.0, "numbers": {"n": 2.0}, "tolerance": "t|u"},
        {"check": "b", "status": "ok", "seconds": 2.0, "numbers": {}, "tolerance": None, "target": "met"},
    ]
    info = {
        "mode": "gpu",
        "date": "d",
        "budget_s": 450,
        "cpu_cores": 16,
        "python": "3.12",
        "cuda_build": "13.0",
    }
    info |= {"versions": {"torch": "2.11"}, "exemplar_commit": "abc", "wheels": "none"}
    lines = gpu_check.markdown({"info": info, "rows": rows}).splitlines()
    body = [line for line in lines if line.startswith("| a |") or line.startswith("| b |")]
    assert len(body) == 2
    assert all(line.count("|") == 6 for line in body)
