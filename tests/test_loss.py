"""The chunked loss: equal to the model's own loss, invariant to how a step is split."""

from __future__ import annotations

import contextlib

import peft
import pytest
import torch

from exemplar.data.schema import IGNORE_INDEX
from exemplar.train.batch import collate_packed, collate_padded
from exemplar.train.batching import TrainPlan
from exemplar.train.loop import train_step
from exemplar.train.loss import LMLoss
from tests.train_helpers import synthetic_examples, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = synthetic_examples(6, seed=1, min_len=3, max_len=16)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2"])
def test_chunked_loss_and_grads_match_the_model(kind):
    model = tiny_model(kind, "eager" if kind == "gemma2" else "sdpa").eval()
    batch = collate_padded(EXAMPLES, pad_id=0)

    expected = model(**batch.model_inputs(), labels=batch.labels).loss  # transformers' own shifted mean
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    loss_fn = LMLoss(model, chunk_size=3)  # several chunks: exercises recomputation in backward
    assert loss_fn.check_head()
    sums = loss_fn(batch)
    loss = sums.loss_sum / sums.num_trained
    loss.backward()
    assert sums.num_trained == batch.num_trained
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    _assert_grads_close(_grads(model), expected_grads)


def test_output_layer_sees_only_trained_positions_in_chunks():
    model = tiny_model("llama")
    calls = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: calls.append(tuple(args[0].shape))
    )
    batch = collate_packed([EXAMPLES[:3], EXAMPLES[3:]], pad_id=0)
    LMLoss(model, chunk_size=4)(batch).loss_sum.backward()
    # Never [B, L, hidden]: 2D chunks of at most 4 trained positions, run once in forward and
    # once more in backward (recomputed instead of keeping every chunk's logits).
    assert all(len(shape) == 2 and shape[0] <= 4 for shape in calls)
    assert len(calls) == 2 * -(-batch.num_trained // 4)
    assert sum(shape[0] for shape in calls) == 2 * batch.num_trained


def test_lora_loss_and_grads():
    base = tiny_model("llama")
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    batch = collate_padded(EXAMPLES, pad_id=0)
    expected = lora(**batch.model_inputs(), labels=batch.labels).loss
    sums = LMLoss(lora, chunk_size=5)(batch)
    torch.testing.assert_close(sums.loss_sum / sums.num_trained, expected, atol=1e-6, rtol=1e-6)
    (sums.loss_sum / sums.num_trained).backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_unknown_logit_transform_falls_back_to_full_logits():
    model = tiny_model("llama").eval()
    loss_fn = LMLoss(model, chunk_size=4)
    loss_fn.logit_scale = 2.0  # as if the family post-processed logits in an unknown way
    assert not loss_fn.check_head() and loss_fn.full_logits
    batch = collate_padded(EXAMPLES, pad_id=0)
    sums = loss_fn(batch)
    expected = model(**batch.model_inputs(), labels=batch.labels).loss
    torch.testing.assert_close(sums.loss_sum / sums.num_trained, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2", "full_logits"])
def test_the_loss_without_a_graph_is_the_loss_with_one(kind):
    """Evaluation (no graph) computes the loss in the logits' own memory: the same numbers as
    with a graph, for a scaled or softcapped head and for the model's full logits too."""
    model = tiny_model("gemma2" if kind == "full_logits" else kind, "eager").eval()
    loss_fn = LMLoss(model, chunk_size=3)
    if kind == "full_logits":
        loss_fn.logit_scale = 2.0  # a transform check_head does not recognise: full logits
        assert not loss_fn.check_head() and loss_fn.full_logits
    batch = collate_padded(EXAMPLES, pad_id=0)
    with_graph = loss_fn(batch, with_accuracy=True, reduction="none")
    with torch.no_grad():
        tokens = loss_fn(batch, with_accuracy=True, reduction="none")
        summed = loss_fn(batch, with_accuracy=True)
    torch.testing.assert_close(tokens.loss_sum, with_graph.loss_sum.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(summed.loss_sum, with_graph.loss_sum.detach().sum(), atol=1e-5, rtol=1e-6)
    assert torch.equal(tokens.num_correct, with_graph.num_correct)
    assert int(summed.num_correct) == int(with_graph.num_correct.sum())


def test_token_accuracy_is_argmax_over_trained_tokens():
    model = tiny_model("qwen2").eval()
    batch = collate_padded(EXAMPLES, pad_id=0)
    with torch.no_grad():
        sums = LMLoss(model, chunk_size=7)(batch, with_accuracy=True)
        logits = model(**batch.model_inputs()).logits[:, :-1]
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE_INDEX
    assert int(sums.num_correct) == int((logits.argmax(-1)[trained] == targets[trained]).sum())


def test_micro_batch_without_trained_tokens_backpropagates_zero():
    model = tiny_model("llama")
    batch = collate_packed([[([5, 6, 7], [IGNORE_INDEX] * 3)]], pad_id=0)
    sums = LMLoss(model)(batch)
    sums.loss_sum.backward()
    assert sums.num_trained == 0 and float(sums.loss_sum) == 0.0


# ---------------------------------------------------------------------------------------------
# The loss of a step does not depend on how it is split


def _step_grads(model, micro_batches, sync=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # leaves the weights alone; grads stay
    result = train_step(
        LMLoss(model, chunk_size=8),
        optimizer,
        micro_batches,
        max_grad_norm=None,
        autocast=contextlib.nullcontext,
        sync=sync,
    )
    return result, _grads(model)


def _load(rows_list, examples):
    return [collate_packed([[examples[i] for i in row] for row in rows], pad_id=0) for rows in rows_list]


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accumulation_invariance(packing):
    examples = synthetic_examples(40, seed=2, min_len=2, max_len=20)
    lengths = [len(ids) for ids, _ in examples]
    model = tiny_model("llama").eval()
    results = {}
    for mbs, ga in [(8, 1), (2, 4), (1, 8)]:
        plan = TrainPlan.build(
            lengths, max_length=32, packing=packing, micro_batch_size=mbs, grad_accum=ga, seed=5
        )
        step = plan.epoch_steps(0)[0]
        micro = plan.rank_micro_batches(step)
        assert len(micro) == ga
        model.zero_grad(set_to_none=True)
        results[(mbs, ga)] = (sorted(step), *_step_grads(model, _load(micro, examples)))
    (steps_a, res_a, grads_a), *others = results.values()
    for steps_b, res_b, grads_b in others:
        assert steps_b == steps_a  # the same examples form the step
        assert res_b.num_trained == res_a.num_trained
        assert res_b.loss == pytest.approx(res_a.loss, abs=1e-6)
        assert res_b.grad_norm == pytest.approx(res_a.grad_norm, abs=1e-6)
        _assert_grads_close(grads_b, grads_a)


def _rank_step(rank: int, store: str, shares: list, examples: list, out: str) -> None:
    """One of two Gloo ranks: its share of the step through train_step, with the real RankSync."""
    import torch.distributed as dist

    from exemplar.train.distributed import RankSync, current_world

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # No DDP wrapper: each rank keeps its own gradient, which the test sums.
        sync = RankSync(current_world(), "ddp")
        result, grads = _step_grads(tiny_model("llama").eval(), _load(shares[rank], examples), sync=sync)
        torch.save({"result": result.__dict__, "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_world_size_invariance(tmp_path):
    """Two ranks, each normalizing by the all-reduced token count, sum to the one-process gradient
    and report the one-process loss and counts."""
    examples = synthetic_examples(24, seed=4)
    lengths = [len(ids) for ids, _ in examples]
    plan = TrainPlan.build(lengths, max_length=48, packing=True, micro_batch_size=2, grad_accum=2, seed=1)
    step = plan.epoch_steps(0)[0]
    alone, one_rank = _step_grads(tiny_model("llama").eval(), _load(plan.rank_micro_batches(step), examples))

    shares = [plan.rank_micro_batches(step, rank, 2) for rank in range(2)]
    assert all(shares)  # both ranks hold part of the step
    args = (str(tmp_path / "store"), shares, examples, str(tmp_path))
    torch.multiprocessing.start_processes(_rank_step, args=args, nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for saved in ranks:
        result = saved["result"]
        assert result["num_trained"] == alone.num_trained and result["num_tokens"] == alone.num_tokens
        assert result["loss"] == pytest.approx(alone.loss, abs=1e-6)
    summed = {name: ranks[0]["grads"][name] + ranks[1]["grads"][name] for name in ranks[0]["grads"]}
    _assert_grads_close(summed, one_rank)
