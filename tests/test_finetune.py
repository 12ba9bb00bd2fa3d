"""`exemplar train` end to end: each architecture trains and exports; resume after SIGKILL reuses the
cached preprocessing and gives the same losses; LoRA adapters merge; the quickstart learns."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.quickstart import tokenizer_path
from exemplar.train.checkpoint import latest_checkpoint
from exemplar.train.finetune import finetune

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCHITECTURES = {
    "llama": {"model_type": "llama", **TINY, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", **TINY, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", **TINY, "num_key_value_heads": 2},
    "gemma": {"model_type": "gemma", **TINY, "num_key_value_heads": 1, "head_dim": 8},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_data(path, n=24):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Reverse: {w}"},
                {"role": "assistant", "content": w[::-1]},
            ]
        }
        for w in (f"abc{i}" for i in range(n))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_dict(tmp_path, model, **train):
    return {
        "model": {"from_config": {**model, "vocab_size": 3072}},
        "tokenizer": tokenizer_path(),
        "data": {
            "train": [{"path": str(write_data(tmp_path / "d.jsonl"))}],
            "cache_dir": str(tmp_path / "cache"),
        },
        "max_length": 64,
        "train": {"micro_batch_size": 4, "max_steps": 3, "lr": 1e-3, **train},
        "output_dir": str(tmp_path / "out"),
    }


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_trains_and_exports_a_loadable_model(tmp_path, arch):
    summary = finetune(load_config(None, **config_dict(tmp_path, ARCHITECTURES[arch])), progress=False)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s", "elapsed_s"):
        assert key in rows[0]
    saved = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    for key in (
        "steps",
        "tokens",
        "trained_tokens",
        "train_wall_s",
        "tokens_per_s",
        "peak_rss_mb",
        "final_loss",
    ):
        assert key in saved
    assert saved == json.loads(json.dumps(summary))  # the returned summary, outputs included
    assert saved["outputs"]["model"] == str(tmp_path / "out" / "model")
    model = AutoModelForCausalLM.from_pretrained(summary["outputs"]["model"])
    tokenizer = AutoTokenizer.from_pretrained(summary["outputs"]["model"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > len(ids)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def _losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_matches_an_uninterrupted_run_and_reuses_the_cache(tmp_path):
    # Big enough that steps take tens of milliseconds, so the kill lands mid-run.
    model = {**ARCHITECTURES["llama"], "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference_dir, killed_dir):
        folder.mkdir()
        config = config_dict(folder, model, max_steps=40, save_every=3, lr=3e-3)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(reference_dir / "config.yaml")]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exemplar", "train", str(killed_dir / "config.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed_dir / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = len(_losses(killed_dir / "out"))
    assert 0 < done_before_kill < 40, "the run finished before it could be killed"

    assert main(["train", str(killed_dir / "config.yaml"), "--resume"]) == 0
    assert _losses(killed_dir / "out") == _losses(reference_dir / "out")
    summary = json.loads((killed_dir / "out" / "train_summary.json").read_text())
    assert any("(cached)" in line for line in summary["data"][0])


def test_lora_run_writes_an_adapter_that_merges_into_a_loadable_model(tmp_path):
    # train.merge: the run also writes the model merged in memory, which `exemplar merge` must rebuild
    config = config_dict(tmp_path, ARCHITECTURES["llama"], method="lora", merge=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--config",
                str(tmp_path / "config.yaml"),
                "--adapter",
                str(adapter),
                "--out",
                str(merged),
            ]
        )
        == 0
    )
    from_cli = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    in_run = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").state_dict()
    assert from_cli.keys() == in_run.keys()
    for name, weight in in_run.items():
        torch.testing.assert_close(from_cli[name], weight, rtol=0, atol=1e-6, msg=name)


def test_qlora_without_cuda_fails_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine can run QLoRA")
    config = config_dict(tmp_path, ARCHITECTURES["llama"], method="qlora")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "qlora needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # no preprocessing happened


def test_generate_command_answers_each_prompt(tmp_path):
    finetune(load_config(None, **config_dict(tmp_path, ARCHITECTURES["llama"])), progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse: abc"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "answers.jsonl"
    args = ["generate", str(tmp_path / "out" / "model"), "--input", str(prompts), "--output", str(out)]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("prompt") for r in rows] == ["Reverse: abc", None]
    assert all(isinstance(r["response"], str) and isinstance(r["stopped"], bool) for r in rows)


def _check_quickstart_folder(out) -> None:
    summary = json.loads((out / "quickstart_summary.json").read_text())
    assert set(summary) >= {"before", "after", "wall_s", "model_dir"}
    # The model folder holds the trained weights: those of the run's last checkpoint.
    trained = load_file(latest_checkpoint(out / "checkpoints") / "model.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).state_dict()
    assert trained.keys() <= saved.keys()
    for name, weight in trained.items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=0, msg=name)


# The README's 300 training steps take minutes on a 2-core CPU: the slow CI step runs them, the
# default suite the same command cut to 3 steps (test_a_short_quickstart_writes_its_folder).
@pytest.mark.slow
def test_quickstart_learns_the_held_out_skill(tmp_path):
    """The README's main command: exact match from at most 0.05 to at least 0.50."""
    from exemplar.quickstart import run_quickstart

    result = run_quickstart(tmp_path / "qs", progress=False)
    assert result["before"]["exact_match"] <= 0.05
    assert result["after"]["exact_match"] >= 0.50
    assert result["after"]["stop_rate"] > result["before"]["stop_rate"]
    _check_quickstart_folder(tmp_path / "qs")


def test_a_short_quickstart_writes_its_folder(tmp_path):
    """The quickstart's data, training, export and both evaluations, on 3 steps."""
    from exemplar.quickstart import run_quickstart

    result = run_quickstart(tmp_path / "qs", steps=3, progress=False)
    assert result["before"]["exact_match"] <= 0.05  # a random model does not know the skill
    for when in ("before", "after"):
        assert set(result[when]) >= {"exact_match", "stop_rate"}
    _check_quickstart_folder(tmp_path / "qs")


def test_tensorboard_receives_the_step_metrics_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    finetune(load_config(None, **config_dict(tmp_path, ARCHITECTURES["llama"])), progress=False)
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    loss_tag = next(tag for tag in tags if tag.endswith("loss"))
    assert [e.step for e in events.Scalars(loss_tag)] == [1, 2, 3]
