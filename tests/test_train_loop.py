"""The batch plan, the learning-rate schedule, and whole training runs on a tiny model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file

from exemplar.config import TrainConfig
from exemplar.data.lengths import example_lengths
from exemplar.errors import ExemplarError
from exemplar.train.batching import TrainPlan
from exemplar.train.loop import run_training
from exemplar.train.metrics import read_metrics
from exemplar.train.schedule import lr_at
from tests.train_helpers import make_config, synthetic_dataset, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = np.random.default_rng(0).integers(1, 40, size=203)

# ---------------------------------------------------------------------------------------------
# The plan


def _plan(**kw):
    args = dict(max_length=48, packing=True, micro_batch_size=3, grad_accum=2, seed=7) | kw
    return TrainPlan.build(LENGTHS, **args)


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_once_per_epoch(packing):
    plan = _plan(packing=packing)
    for epoch in range(2):
        seen = sorted(i for step in plan.epoch_steps(epoch) for row in step for i in row)
        assert seen == list(range(len(LENGTHS)))
        assert len(plan.epoch_steps(epoch)) == plan.steps_per_epoch
    assert all(len(step) <= 6 for step in plan.epoch_steps(0))
    assert plan.epoch_steps(0) != plan.epoch_steps(1)  # reshuffled each epoch
    assert plan.epoch_steps(1) == _plan(packing=packing).epoch_steps(1)  # but deterministic


def test_example_lengths_follow_the_dataset_view():
    ds = synthetic_dataset(10, seed=1)
    view = ds.shuffle(seed=3).select(range(4))  # an indices mapping over the arrow table
    assert example_lengths(view).tolist() == [len(ids) for ids in view["input_ids"]]


def test_plan_without_shuffle_keeps_order():
    plan = _plan(packing=False, shuffle=False)
    assert [row for step in plan.epoch_steps(3) for row in step] == [(i,) for i in range(len(LENGTHS))]


def test_resuming_the_plan_at_any_step_gives_the_same_steps():
    plan = _plan()
    total = plan.total_steps(epochs=2.5, max_steps=None)
    assert total == math.ceil(2.5 * plan.steps_per_epoch)
    full = list(plan.iter_steps(0, total))
    assert [s for s, _, _ in full] == list(range(total))
    for start in [1, plan.steps_per_epoch, plan.steps_per_epoch + 3, total - 1]:
        assert list(_plan().iter_steps(start, total)) == full[start:]
    assert full[-1][1] == 2  # the third epoch, partly


def test_max_steps_crosses_epochs():
    plan = _plan()
    steps = list(plan.iter_steps(0, plan.total_steps(epochs=1, max_steps=plan.steps_per_epoch * 2 + 1)))
    assert [e for _, e, _ in steps].count(2) == 1


def test_token_budget_micro_batches():
    plan = _plan(max_tokens_per_batch=100, packing=False, grad_accum=3)
    for step in plan.epoch_steps(0):
        micro = plan.rank_micro_batches(step)
        assert len(micro) <= 3
        for rows in micro:
            assert len(rows) == 1 or len(rows) * max(plan.row_length(r) for r in rows) <= 100


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_a_step_is_the_same_examples_whatever_the_world_size(world_size):
    plan = _plan()
    for step in plan.epoch_steps(0)[:5]:
        shares = [plan.rank_micro_batches(step, rank, world_size) for rank in range(world_size)]
        rows = [row for share in shares for micro in share for row in micro]
        assert sorted(rows) == sorted(step)


# ---------------------------------------------------------------------------------------------
# The schedule


def test_learning_rate_schedules():
    cosine = TrainConfig(lr=1.0, warmup_steps=2, lr_scheduler="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, 10, cosine) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_at(6, 10, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    decay = [lr_at(s, 10, cosine) for s in range(2, 10)]
    assert decay == sorted(decay, reverse=True) and decay[-1] > 0.1
    linear = TrainConfig(lr=1.0, warmup_steps=0, lr_scheduler="linear")
    assert [lr_at(s, 4, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    constant = TrainConfig(lr=2.0, warmup_ratio=0.5, lr_scheduler="constant")
    assert [lr_at(s, 4, constant) for s in range(4)] == [1.0, 2.0, 2.0, 2.0]
    assert TrainConfig(method="lora").resolved_lr() == 2e-4


# ---------------------------------------------------------------------------------------------
# Whole runs

STEP_KEYS = {
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "trained_tokens",
    "tokens_per_s",
    "elapsed_s",
}
SUMMARY_KEYS = {
    "steps", "tokens", "trained_tokens", "train_wall_s", "tokens_per_s", "peak_rss_mb", "final_loss",
    "eval_loss", "eval_perplexity", "eval_token_accuracy",
}  # fmt: skip


def _run(tmp_path, *overrides, kind="llama", model=None, n=48, eval_n=0, name="run", **kw):
    config = make_config(tmp_path / name, *overrides, **kw)
    ds = synthetic_dataset(n, seed=11)
    eval_ds = synthetic_dataset(eval_n, seed=12) if eval_n else None
    summary = run_training(config, model or tiny_model(kind), None, ds, eval_ds)
    return summary, read_metrics(tmp_path / name / "metrics.jsonl")


def test_run_writes_metrics_summary_and_checkpoints(tmp_path):
    summary, rows = _run(
        tmp_path, "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every=3", "train.save_every=2",
        "train.lr=1e-3", eval_n=10,
    )  # fmt: skip
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    assert all(r.keys() >= STEP_KEYS for r in steps)
    assert (
        sum(r["tokens"] for r in steps)
        == summary["tokens"]
        == sum(len(x) for x in synthetic_dataset(48, 11)["input_ids"])
    )
    last = summary["steps"]
    assert [r["step"] for r in evals] == sorted({*range(3, last + 1, 3), last})
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["final_loss"] == steps[-1]["loss"]
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_wall_s"], rel=1e-3)
    assert 0 < summary["fill_ratio"] <= 1
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [f"step-{s:06d}" for s in sorted({*range(2, last + 1, 2), last})][-2:]


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    # GPT-2 has dropout: this also checks that the RNG is seeded.
    args = ("train.micro_batch_size=2", "train.grad_accum=2", "train.lr=1e-3")
    _, a = _run(tmp_path, *args, kind="gpt2", name="a")
    _, b = _run(tmp_path, *args, kind="gpt2", name="b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    _, c = _run(tmp_path, *args, "train.seed=1", kind="gpt2", name="c")
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_loss_goes_down(tmp_path):
    summary, rows = _run(
        tmp_path, "train.lr=1e-2", "train.epochs=6", "train.micro_batch_size=4", "train.warmup_steps=0", n=16
    )
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize(
    "overrides",
    [
        ("packing=false", "train.micro_batch_size=3"),
        ("packing=false", "train.max_tokens_per_batch=64", "train.grad_accum=2"),
        ("train.max_tokens_per_batch=96",),
        ("train.max_grad_norm=null", "train.lr_scheduler=linear", "train.max_steps=3"),
    ],
)
def test_batching_modes_train(tmp_path, overrides):
    summary, rows = _run(tmp_path, "train.lr=1e-3", *overrides)
    assert summary["steps"] == len(rows) > 0
    assert summary["tokens"] == sum(r["tokens"] for r in rows)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, method):
    def model():
        if method == "full":
            return None
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        return peft.get_peft_model(tiny_model(), config)

    args = ("train.max_steps=3", "train.lr=1e-3", f"train.method={method}")
    _, plain = _run(tmp_path, *args, model=model(), name="plain")
    with warnings.catch_warnings():
        # None of our calls is deprecated (peft itself still asks `is_gradient_checkpointing`).
        warnings.filterwarnings("error", r"`gradient_checkpointing_(enable|disable)`", FutureWarning)
        _, ckpt = _run(tmp_path, *args, "train.gradient_checkpointing=true", model=model(), name="ckpt")
    np.testing.assert_allclose([r["loss"] for r in ckpt], [r["loss"] for r in plain], atol=1e-6)
    assert all(r["grad_norm"] > 0 for r in ckpt)


def test_bf16_autocast_on_cpu(tmp_path):
    _, fp32 = _run(tmp_path, "train.max_steps=2", name="fp32")
    _, bf16 = _run(tmp_path, "train.max_steps=2", "train.precision=bf16", name="bf16")
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast really ran
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)


def test_lora_run_saves_only_adapter_weights(tmp_path):
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    summary, rows = _run(tmp_path, "train.method=lora", "train.max_steps=3", model=model)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-000003" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert rows[0]["lr"] == pytest.approx(2e-4)  # the LoRA default (3 steps, 1 warmup step)


def test_keep_best_keeps_the_best_checkpoint(tmp_path):
    # lr so high the eval loss gets worse after the first evaluation: the best stays at step 1.
    summary, rows = _run(
        tmp_path, "train.lr=0.5", "train.warmup_steps=0", "train.max_steps=6", "train.eval_every=1",
        "train.keep_best=true", "train.keep_last=1", "train.micro_batch_size=2", eval_n=8,
    )  # fmt: skip
    best = summary["best_step"]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert evals[best] == min(evals.values()) == summary["best_eval_loss"]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == sorted({f"step-{best:06d}", "step-000006"})
    assert summary["best_checkpoint"].endswith(f"step-{best:06d}")


def test_rows_longer_than_max_length_are_refused(tmp_path):
    with pytest.raises(ExemplarError, match="training row .* has 30 tokens"):
        run_training(
            make_config(tmp_path, max_length=24),
            tiny_model(),
            None,
            synthetic_dataset(8, min_len=30, max_len=30),
        )
