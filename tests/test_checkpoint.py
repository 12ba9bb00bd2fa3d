"""Checkpoints: what is saved, atomicity, and resuming (also after SIGKILL) with the same losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch

from exemplar.errors import ExemplarError
from exemplar.train.checkpoint import (
    _write_manifest,
    latest_checkpoint,
    list_checkpoints,
    load_trainable_state_dict,
    prune_checkpoints,
    remove_stale,
    trainable_state_dict,
)
from exemplar.train.loop import run_training
from exemplar.train.metrics import read_metrics, truncate_metrics
from tests.train_helpers import make_config, synthetic_dataset, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# What is saved


def test_full_state_dict_saves_tied_weights_once_and_loads_back(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("gemma")  # tied head
    state = trainable_state_dict(model)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    save_file(state, str(tmp_path / "m.safetensors"))
    other = tiny_model("gemma", seed=1)
    load_trainable_state_dict(other, tmp_path / "m.safetensors")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_lora_state_dict_is_adapter_only():
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    state = trainable_state_dict(model)
    assert len(state) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".lora_A." in k or ".lora_B." in k for k in state)


def test_loading_weights_of_another_model_fails(tmp_path):
    from safetensors.torch import save_file

    save_file({"nope.weight": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ExemplarError, match="do not match"):
        load_trainable_state_dict(tiny_model(), tmp_path / "m.safetensors")


# ---------------------------------------------------------------------------------------------
# Folders


def _fake_checkpoint(root: Path, name: str, complete: bool = True) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "trainer_state.json").write_text("{}")
    if complete:
        _write_manifest(root / name)


def test_only_complete_checkpoints_count(tmp_path):
    _fake_checkpoint(tmp_path, "step-000002")
    _fake_checkpoint(tmp_path, "step-000004")
    _fake_checkpoint(tmp_path, ".tmp-step-000006-123")  # killed while writing
    _fake_checkpoint(tmp_path, "step-000008", complete=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert latest_checkpoint(tmp_path).name == "step-000004"
    remove_stale(tmp_path)
    assert not (tmp_path / ".tmp-step-000006-123").exists()


def test_prune_keeps_last_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, f"step-{step:06d}")
    prune_checkpoints(tmp_path, keep_last=2, keep={2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004", "step-000005"]


def test_truncate_metrics_drops_later_rows_and_partial_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 2, "eval_loss": 1}\n{"step": 3}\n{"ste')
    truncate_metrics(path, 2)
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 2, "eval_loss": 1}]


# ---------------------------------------------------------------------------------------------
# Resuming

# The same script runs in-process (reference and resumed runs) and as a subprocess that is killed.
SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from exemplar.train.loop import run_training
    from tests.train_helpers import make_config, synthetic_dataset, tiny_model

    def main(output_dir, resume=False, slow_after=None, callbacks=()):
        config = make_config(
            output_dir, "train.micro_batch_size=2", "train.grad_accum=2", "train.lr=1e-3",
            "train.max_steps=9", "train.save_every=2", "train.keep_last=2", "train.eval_every=4",
        )
        def slow(event, row):
            if event == "step_end" and slow_after is not None and row["step"] >= slow_after:
                time.sleep(0.5)  # leave the killer time to strike mid-run
        model = tiny_model("gpt2")  # dropout: the resumed run must restore the RNG too
        return run_training(
            config, model, None, synthetic_dataset(40, seed=3), synthetic_dataset(6, seed=4),
            resume=resume, callbacks=[slow, *callbacks],
        )

    if __name__ == "__main__":
        main(sys.argv[1], slow_after=int(sys.argv[2]))
    """
)


def _script(tmp_path: Path) -> dict:
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT)
    namespace: dict = {"__name__": "train_script"}
    exec(compile(SCRIPT, str(path), "exec"), namespace)
    return namespace


def _losses(output_dir: Path) -> list[tuple[int, float, float]]:
    rows = read_metrics(output_dir / "metrics.jsonl")
    for kind in ("loss", "eval_loss"):
        steps = [r["step"] for r in rows if kind in r]
        assert len(steps) == len(set(steps)), f"duplicate {kind} rows"
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r] + [
        (r["step"], r["eval_loss"], r["eval_token_accuracy"]) for r in rows if "eval_loss" in r
    ]


def test_resume_after_a_crash_gives_the_same_losses(tmp_path):
    script = _script(tmp_path)
    reference = script["main"](tmp_path / "ref")

    def crash(event, row):
        if event == "step_end" and row["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        script["main"](tmp_path / "run", callbacks=[crash])
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000004"
    resumed = script["main"](tmp_path / "run", resume=True)

    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert resumed["resumed_from"].endswith("step-000004")
    for key in ("steps", "tokens", "trained_tokens", "final_loss", "eval_loss"):
        assert resumed[key] == reference[key], key


def test_resume_after_sigkill_gives_the_same_losses(tmp_path):
    script = _script(tmp_path)
    script["main"](tmp_path / "ref")

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "train_script.py"), str(out), "5"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len([r for r in read_metrics_safe(out / "metrics.jsonl") if "loss" in r]) < 6:
            assert proc.poll() is None, "the training subprocess ended before it could be killed"
            assert time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train_summary.json").exists()

    summary = script["main"](out, resume=True)
    assert summary["resumed_from"].endswith(("step-000004", "step-000006"))
    assert _losses(out) == _losses(tmp_path / "ref")


def read_metrics_safe(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written when killed
            rows.append(json.loads(line))
    return rows


def test_resume_onto_other_data_is_refused(tmp_path):
    config = make_config(tmp_path, "train.max_steps=2")
    run_training(config, tiny_model(), None, synthetic_dataset(12, seed=1))
    with pytest.raises(ExemplarError, match="training data differs"):
        run_training(config, tiny_model(), None, synthetic_dataset(12, seed=2), resume=True)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    config = make_config(tmp_path, "train.max_steps=2")
    summary = run_training(config, tiny_model(), None, synthetic_dataset(12, seed=1), resume=True)
    assert summary["steps"] == 2 and summary["resumed_from"] is None


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    config = make_config(tmp_path, "train.max_steps=1")
    run_training(config, tiny_model(), None, synthetic_dataset(8, seed=1))
    with pytest.raises(ExemplarError, match="already holds checkpoints"):
        run_training(config, tiny_model(), None, synthetic_dataset(8, seed=1))
