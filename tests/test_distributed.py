"""Several ranks with torchrun (Gloo on CPU): FSDP2 and DDP give the losses of one process, sharded
checkpoints resume on 2 ranks and on 1, the gathered model loads in plain transformers, a failing
rank stops the run with its message, and the plan gives every example to exactly one rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from exemplar.config import load_config
from exemplar.quickstart import tokenizer_path
from exemplar.train.batching import TrainPlan
from exemplar.train.metrics import read_metrics, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 3072,
}
# What must agree between runs (rtol): losses to fp32 reduction noise. The reference's own
# grad_norm is a float32 reduction good to ~2e-5 (its float64 value is closer to ours).
RTOL = {"loss": 1e-5, "eval_loss": 1e-5, "grad_norm": 1e-4}
EXACT = ("step", "tokens", "trained_tokens", "lr", "eval_tokens", "eval_token_accuracy")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The plan: every example once per epoch, whatever the number of ranks


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120),
    world_size=st.integers(1, 4),
    micro=st.integers(1, 5),
    accum=st.integers(1, 3),
    packing=st.booleans(),
    budget=st.one_of(st.none(), st.integers(40, 160)),
    epoch=st.integers(0, 2),
)
def test_every_example_goes_to_exactly_one_rank_once_per_epoch(
    lengths, world_size, micro, accum, packing, budget, epoch
):
    args = dict(max_length=40, packing=packing, max_tokens_per_batch=budget, seed=3)
    plan = TrainPlan.build(lengths, micro_batch_size=micro, grad_accum=accum, world_size=world_size, **args)
    seen = []
    for step in plan.epoch_steps(epoch):
        per_rank = [plan.rank_micro_batches(step, r, world_size) for r in range(world_size)]
        assert plan.micro_batches_per_rank(step, world_size) == max(len(m) for m in per_rank)
        rows = [row for micro_batches in per_rank for mb in micro_batches for row in mb]
        assert sorted(rows) == sorted(step)  # the shares tile the step: no gap, no overlap
        if budget is None:
            assert all(len(mb) <= micro for m in per_rank for mb in m)
            assert len(step) <= micro * accum * world_size
        seen += [i for row in rows for i in row]
    assert sorted(seen) == list(range(len(lengths)))
    # The global batch is micro x accum x ranks: the same steps as one process with it all.
    if budget is None:
        alone = TrainPlan.build(lengths, micro_batch_size=micro * world_size, grad_accum=accum, **args)
    else:
        alone = TrainPlan.build(lengths, micro_batch_size=micro, grad_accum=accum * world_size, **args)
    assert alone.epoch_steps(epoch) == plan.epoch_steps(epoch)


def test_world_size_one_keeps_the_single_process_plan():
    lengths = np.random.default_rng(0).integers(1, 40, size=50)
    a = TrainPlan.build(lengths, max_length=48, packing=True, micro_batch_size=3, grad_accum=2, seed=1)
    b = TrainPlan.build(
        lengths, max_length=48, packing=True, micro_batch_size=3, grad_accum=2, seed=1, world_size=1
    )
    assert a.epoch_steps(0) == b.epoch_steps(0) and a.steps_per_epoch == b.steps_per_epoch


def test_nproc_stands_for_a_torchrun_command():
    from exemplar.cli import build_parser
    from exemplar.cli.train_commands import torchrun_command

    args = build_parser().parse_args(["train", "c.yaml", "--nproc", "3", "--set", "a=1", "--resume"])
    command = torchrun_command(args)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=3" in command and "--nproc" not in command
    assert command[command.index("-m", 3) :] == [
        "-m",
        "exemplar",
        "train",
        "c.yaml",
        "--set",
        "a=1",
        "--resume",
    ]


def test_distributed_none_under_torchrun_is_refused(monkeypatch):
    from exemplar.config import TrainConfig
    from exemplar.errors import ConfigError
    from exemplar.train.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed is 'none'"):
        init_distributed(TrainConfig(distributed="none"))


def test_the_strategy_is_one_decision_from_the_config_and_the_ranks():
    from exemplar.config import TrainConfig
    from exemplar.errors import ConfigError
    from exemplar.train.distributed import World, resolve_strategy

    two = World(world_size=2)
    assert resolve_strategy(TrainConfig(distributed="fsdp2"), World()) == "none"
    assert resolve_strategy(TrainConfig(), two) == "fsdp2"
    assert resolve_strategy(TrainConfig(method="qlora"), two) == "ddp"  # 4-bit weights do not shard
    assert resolve_strategy(TrainConfig(distributed="ddp"), two) == "ddp"
    assert resolve_strategy(TrainConfig(cpu_offload_optimizer=True), two) == "fsdp2"
    with pytest.raises(ConfigError, match="cpu_offload_optimizer"):
        resolve_strategy(TrainConfig(distributed="ddp", cpu_offload_optimizer=True), two)
    with pytest.raises(ConfigError, match="distributed is 'none'"):
        resolve_strategy(TrainConfig(distributed="none"), two)


# ---------------------------------------------------------------------------------------------
# Whole runs on 2 ranks


def _write_data(folder: Path) -> None:
    rows = []
    for i in range(41):  # 5 full steps of 8 and a last step of 1 row: rank 1 runs a filler there
        word = "abcdefghij"[: 2 + i % 9] + str(i)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Reverse: {word}"},
                    {"role": "assistant", "content": word[::-1]},
                ]
            }
        )
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    _write_data(folder)
    config = {
        "model": {"from_config": TINY_LLAMA},
        "tokenizer": tokenizer_path(),
        "data": {"train": ["train.jsonl"], "eval": ["eval.jsonl"], "cache_dir": "cache", "num_proc": 1},
        "max_length": 64,
        "packing": False,
        "train": {"micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "save_every": 2, "keep_last": 10},
        "output_dir": "out",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def _in_process(work: Path, out: str, *overrides: str, resume: bool = False) -> dict:
    from exemplar.train.finetune import finetune

    config = load_config(work / "config.yaml", [f"output_dir={out}", *overrides])
    return finetune(config, resume=resume, progress=False)


def _launch(work: Path, *args: str, script: Path | None = None, timeout: float = 240):
    """`python -m torch.distributed.run --nproc_per_node 2 -m exemplar ARGS` (or a script)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    target = [str(script)] if script else ["-m", "exemplar"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*command, *target, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
    )


def _rows(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def _max_diffs(rows: list[dict], reference: list[dict]) -> dict[str, float]:
    """Max abs difference per compared key; asserts the rows line up and exact keys are equal."""
    assert [sorted(r) for r in rows] == [sorted(r) for r in reference]
    diffs: dict[str, float] = {}
    for row, ref in zip(rows, reference, strict=True):
        for key in EXACT:
            if key in ref:
                assert row[key] == ref[key], (key, row, ref)
        for key, rtol in RTOL.items():
            if key in ref:
                np.testing.assert_allclose(
                    row[key], ref[key], rtol=rtol, err_msg=f"{key} at step {ref['step']}"
                )
                diffs[key] = max(diffs.get(key, 0.0), abs(row[key] - ref[key]))
    return diffs


@pytest.fixture(scope="module")
def reference(work) -> list[dict]:
    """One process, micro-batch 8: the global batch of 2 ranks x 4."""
    _in_process(work, "ref", "train.micro_batch_size=8")
    return _rows(work / "ref")


@pytest.fixture(scope="module")
def fsdp(work) -> Path:
    done = _launch(work, "train", "config.yaml", "--set", "output_dir=fsdp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "fsdp"


def test_fsdp2_on_two_ranks_gives_the_losses_of_one_process(work, reference, fsdp, record_property):
    summary = json.loads((fsdp / "train_summary.json").read_text())
    assert summary["distributed"] == "fsdp2" and summary["world_size"] == 2
    diffs = _max_diffs(_rows(fsdp), reference)  # rank 0 alone wrote the metrics: no duplicate rows
    record_property("fsdp2_max_abs_diff", diffs)
    print("fsdp2 vs one process, max abs diff:", diffs)
    step = fsdp / "checkpoints" / "step-000002"
    assert (step / "dcp" / ".metadata").is_file() and (step / "rng-rank1.pt").is_file()


def test_the_gathered_model_is_an_ordinary_folder_with_the_single_process_weights(work, reference, fsdp):
    from transformers import AutoModelForCausalLM

    gathered = AutoModelForCausalLM.from_pretrained(fsdp / "model")
    alone = AutoModelForCausalLM.from_pretrained(work / "ref" / "model")
    assert gathered.state_dict().keys() == alone.state_dict().keys()
    for name, weight in alone.state_dict().items():
        torch.testing.assert_close(gathered.state_dict()[name], weight, rtol=0, atol=1e-5, msg=name)
    assert gathered.generation_config.eos_token_id == alone.generation_config.eos_token_id


# Four processes (the CLI, torchrun, two ranks) for the strategy a run gets only when asked for
# (or with QLoRA): the slow step runs it; test_nproc_stands_for_a_torchrun_command checks the
# launch command and the FSDP2 tests the ranks.
@pytest.mark.slow
def test_ddp_through_nproc_gives_the_losses_of_one_process(work, reference, record_property):
    # `exemplar train --nproc 2` launches torchrun; 2 ranks x micro-batch 2 x accumulation 2 = 8.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [
        "train",
        "config.yaml",
        "--nproc",
        "2",
        "--set",
        "output_dir=ddp",
        "--set",
        "train.distributed=ddp",
    ]
    args += ["--set", "train.micro_batch_size=2", "--set", "train.grad_accum=2"]
    done = subprocess.run(
        [sys.executable, "-m", "exemplar", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count('"outputs"') == 1  # rank 0 alone printed the summary
    assert json.loads(done.stdout[done.stdout.index("{\n") :])["outputs"]["model"].endswith("model")
    assert json.loads((work / "ddp" / "train_summary.json").read_text())["distributed"] == "ddp"
    diffs = _max_diffs(_rows(work / "ddp"), reference)
    record_property("ddp_max_abs_diff", diffs)
    print("ddp vs one process, max abs diff:", diffs)


def _interrupted_copy(source: Path, target: Path, at_step: int) -> None:
    """`target` as `source` was when killed right after the checkpoint of `at_step`."""
    shutil.copytree(source, target)
    for path in (target / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > at_step:
            shutil.rmtree(path)
    for leftover in ("model", "train_summary.json", "tensorboard"):
        path = target / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    truncate_metrics(target / "metrics.jsonl", at_step)


def test_a_sharded_checkpoint_resumes_on_two_ranks(work, fsdp, record_property):
    _interrupted_copy(fsdp, work / "resumed2", at_step=2)
    done = _launch(work, "train", "config.yaml", "--set", "output_dir=resumed2", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((work / "resumed2" / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000002")
    diffs = _max_diffs(_rows(work / "resumed2"), _rows(fsdp))
    record_property("resume_2_ranks_max_abs_diff", diffs)
    print("resumed on 2 ranks vs uninterrupted, max abs diff:", diffs)


def test_a_sharded_checkpoint_resumes_in_one_process(work, fsdp, reference, record_property):
    _interrupted_copy(fsdp, work / "resumed1", at_step=4)
    summary = _in_process(work, "resumed1", "train.micro_batch_size=8", resume=True)
    assert summary["resumed_from"].endswith("step-000004")
    diffs = _max_diffs(_rows(work / "resumed1"), _rows(fsdp))
    record_property("resume_1_process_max_abs_diff", diffs)
    print("resumed in 1 process vs uninterrupted 2 ranks, max abs diff:", diffs)
    _max_diffs(_rows(work / "resumed1"), reference)


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_on_two_ranks(work, reference):
    _interrupted_copy(work / "ref", work / "from_one", at_step=2)
    done = _launch(work, "train", "config.yaml", "--set", "output_dir=from_one", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _max_diffs(_rows(work / "from_one"), reference)


@pytest.mark.slow
def test_lora_with_fsdp2_matches_one_process_and_writes_an_adapter(work):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = ("train.method=lora", "train.lr=1e-2", "train.merge=true")
    _in_process(work, "lora_ref", "train.micro_batch_size=8", *lora)
    args = [x for item in lora for x in ("--set", item)]
    done = _launch(work, "train", "config.yaml", "--set", "output_dir=lora", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _max_diffs(_rows(work / "lora"), _rows(work / "lora_ref"))
    adapter, alone = (
        load_file(work / d / "adapter" / "adapter_model.safetensors") for d in ("lora", "lora_ref")
    )
    assert adapter.keys() == alone.keys() and all("lora_" in k for k in adapter)
    for name, weight in alone.items():
        torch.testing.assert_close(adapter[name], weight, rtol=0, atol=1e-5, msg=name)
    merged = AutoModelForCausalLM.from_pretrained(work / "lora" / "model")
    reference = AutoModelForCausalLM.from_pretrained(work / "lora_ref" / "model")
    for name, weight in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], weight, rtol=0, atol=1e-5, msg=name)


FAILING = textwrap.dedent(
    """
    import os, sys
    import exemplar.train.loop as loop

    def train_step(*args, **kwargs):
        if os.environ["RANK"] == "1":
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    real, loop.train_step = loop.train_step, train_step
    from exemplar.cli import main
    raise SystemExit(main(sys.argv[1:]))
    """
)


def test_an_error_on_one_rank_stops_the_run_with_its_message(work):
    script = work / "failing.py"
    script.write_text(FAILING)
    # Rank 0 waits in a collective for rank 1, which will never come: unless torchrun stops it, the
    # run outlasts the timeout (the collective's own is 30 minutes) and the test fails.
    done = _launch(work, "train", "config.yaml", "--set", "output_dir=failing", script=script, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rank 1: error: RuntimeError: disk on fire" in output
    assert not (work / "failing" / "train_summary.json").exists()
