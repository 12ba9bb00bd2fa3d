"""Faults during a real training run: SIGTERM/SIGINT, NaN weights, a second run on the same folder.

Signals are real (sent to a real `exemplar train` process); NaN comes from a weight set to NaN
by a callback, the public hook a user has into the loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from exemplar.cli import main
from exemplar.errors import ExemplarError
from exemplar.train.checkpoint import list_checkpoints
from exemplar.train.loop import run_training
from exemplar.train.run_guard import OutputDirBusy
from tests.test_finetune import ARCHITECTURES, _losses, config_dict
from tests.train_helpers import make_config, synthetic_dataset, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _start_training(folder, steps=40):
    # Big enough that a step takes tens of milliseconds, so the signal lands mid-run.
    model = {**ARCHITECTURES["llama"], "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}
    config = config_dict(folder, model, max_steps=steps, save_every=50, lr=3e-3)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def _wait_for_steps(proc, metrics, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach {n} steps (exit status {proc.poll()})")


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[float]:
    """The losses of the uninterrupted 40-step run, which both signals' resumed runs must give."""
    reference_dir = tmp_path_factory.mktemp("reference")
    assert main(["train", str(_start_training(reference_dir))]) == 0
    return _losses(reference_dir / "out")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_says_how_to_resume_and_the_resumed_run_matches(tmp_path, sig, reference_losses):
    stopped_dir = tmp_path / "stopped"
    stopped_dir.mkdir()
    config = _start_training(stopped_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exemplar", "train", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_steps(proc, stopped_dir / "out" / "metrics.jsonl", 5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 128 + sig, stderr
    stopped_at = len(_losses(stopped_dir / "out"))
    assert 5 <= stopped_at < 40
    assert f"{signal.Signals(sig).name} received: stopped after step {stopped_at} of 40" in stderr
    assert "--resume" in stderr
    assert [step for step, _ in list_checkpoints(stopped_dir / "out" / "checkpoints")] == [stopped_at]

    assert main(["train", str(config), "--resume"]) == 0
    assert _losses(stopped_dir / "out") == reference_losses


def _poison_weights_at(step):
    def callback(event, row):
        if event == "step_end" and row["step"] == step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    model = tiny_model()
    return model, callback


def test_nan_weights_are_never_written_to_a_checkpoint(tmp_path):
    model, poison = _poison_weights_at(3)
    config = make_config(tmp_path, "train.max_steps=8", "train.save_every=2", "train.lr=1e-3")
    with pytest.raises(ExemplarError, match="weights hold NaN or infinite values at step 4: not saved"):
        run_training(config, model, None, synthetic_dataset(24, seed=1), callbacks=[poison])
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]


def test_steps_with_a_nan_loss_are_skipped_counted_and_stop_the_run(tmp_path):
    model, poison = _poison_weights_at(2)
    config = make_config(tmp_path, "train.max_steps=20", "train.lr=1e-3", "train.max_nonfinite_in_a_row=3")
    with pytest.raises(ExemplarError, match=r"stopped at step 5: .*NaN or infinite in 3 steps in a row"):
        run_training(config, model, None, synthetic_dataset(24, seed=1), callbacks=[poison])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("nonfinite")] == [3, 4, 5]
    assert all(r.get("skipped") for r in rows if r.get("nonfinite"))


def test_a_second_run_on_a_busy_output_dir_refuses_and_the_first_finishes(tmp_path):
    config = _start_training(tmp_path, steps=15)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "exemplar", "train", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_steps(first, tmp_path / "out" / "metrics.jsonl", 2)
        with pytest.raises(OutputDirBusy, match=rf"in use by another run \(pid {first.pid} "):
            _second_run(config)
    finally:
        assert first.wait(timeout=300) == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 15
    assert len(_losses(tmp_path / "out")) == 15  # no interleaved rows from the refused run


def _second_run(config_path):
    from exemplar.config import load_config
    from exemplar.train.finetune import finetune

    finetune(load_config(config_path), progress=False)
