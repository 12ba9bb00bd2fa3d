"""The fused linear cross-entropy and the per-document packed attention: same numbers as the plain
paths, only less work and memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exemplar.data.schema import IGNORE_INDEX
from exemplar.train import loss as loss_module
from exemplar.train.attention import PACKED_SDPA
from exemplar.train.batch import collate_packed, collate_padded, flatten_batch
from exemplar.train.loss import LMLoss, fused_linear_cross_entropy
from tests.train_helpers import synthetic_examples, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = synthetic_examples(7, seed=3, min_len=1, max_len=14)
ROWS = [EXAMPLES[0:3], EXAMPLES[3:5], EXAMPLES[5:7]]


def _reference(hidden, weight, bias, targets, scale=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias).float() * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def _leaves(n=11, d=6, vocab=17, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("chunk_size", [1, 3, 11, 64])
@pytest.mark.parametrize(
    ("bias", "scale", "softcap"), [(False, 1.0, None), (True, 0.5, None), (False, 1.0, 2.0)]
)
def test_fused_matches_plain_cross_entropy(chunk_size, bias, scale, softcap):
    hidden, weight, b, targets = _leaves(bias=bias)
    expected, expected_hits = _reference(hidden, weight, b, targets, scale, softcap)
    (expected * 0.37).backward()  # any upstream gradient: the fused backward scales by it
    grads = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    loss, hits = fused_linear_cross_entropy(
        hidden,
        weight,
        b,
        targets,
        chunk_size=chunk_size,
        logit_scale=scale,
        softcap=softcap,
        with_accuracy=True,
    )
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    assert int(hits) == int(expected_hits)
    (loss * 0.37).backward()
    for got, want in zip([t.grad for t in (hidden, weight, b) if t is not None], grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_gradients_only_for_what_requires_them():
    hidden, weight, _, targets = _leaves()
    weight.requires_grad_(False)  # a frozen head (LoRA): only the hidden states get a gradient
    loss, _ = fused_linear_cross_entropy(hidden, weight, None, targets, chunk_size=4)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_fused_logits_never_exceed_one_chunk(monkeypatch):
    """The output layer runs on at most `chunk_size` positions at a time, each once."""
    hidden, weight, _, targets = _leaves(n=10)
    rows = []
    real_linear = F.linear

    def spy(x, w, b=None):
        if w.shape[0] == weight.shape[0]:
            rows.append(x.shape[0])
        return real_linear(x, w, b)

    monkeypatch.setattr(loss_module.F, "linear", spy)
    loss, _ = fused_linear_cross_entropy(hidden, weight, None, targets, chunk_size=4)
    loss.backward()  # no recomputation in backward
    assert rows == [4, 4, 2]


def test_lm_loss_takes_the_fused_path_only_where_it_applies():
    model = tiny_model("llama")
    loss_fn = LMLoss(model, chunk_size=5)
    hidden = torch.randn(3, model.config.hidden_size, requires_grad=True)
    assert loss_fn._can_fuse(hidden)
    with torch.no_grad():
        assert not loss_fn._can_fuse(hidden)  # evaluation: the plain chunks are as cheap
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: None)
    assert not loss_fn._can_fuse(hidden)  # someone watches the head: call it as a module
    handle.remove()


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_fused_and_plain_paths_give_the_same_step(kind):
    """Loss and every parameter gradient agree between the fused path and the module path."""
    batch = collate_packed(ROWS, pad_id=0)
    results = []
    for fused in (True, False):
        model = tiny_model(kind, "eager" if kind == "gemma2" else "sdpa")
        loss_fn = LMLoss(model, chunk_size=4)
        if not fused:  # a hook sends the head through the plain (module) path
            model.get_output_embeddings().register_forward_hook(lambda *a: None)
        sums = loss_fn(batch)
        (sums.loss_sum / sums.num_trained).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sums.loss_sum.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_fused_under_bf16_autocast_is_close_to_the_plain_path():
    model = tiny_model("llama")
    batch = collate_packed(ROWS, pad_id=0)
    values = []
    for hook in (False, True):
        if hook:
            model.get_output_embeddings().register_forward_hook(lambda *a: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums = LMLoss(model, chunk_size=4)(batch)
        values.append(float(sums.loss_sum.detach()) / sums.num_trained)
    assert values[0] == pytest.approx(values[1], rel=2e-2)


# ---------------------------------------------------------------------------------------------
# Packed attention


def test_packed_batches_carry_their_documents():
    batch = collate_packed(ROWS, pad_id=0)
    width = batch.input_ids.shape[1]
    for docs, row, real in zip(batch.doc_lengths, ROWS, batch.row_lengths, strict=True):
        assert sum(docs) == width
        assert docs[: len(row)] == [len(ids) for ids, _ in row]
        assert docs[len(row) :] == ([width - real] if width > real else [])
    assert collate_padded(EXAMPLES, pad_id=0).doc_lengths is None
    flat = flatten_batch(batch)
    assert flat.doc_lengths == [[len(ids) for row in ROWS for ids, _ in row]]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "gpt2"])
def test_per_document_attention_equals_the_masked_row(kind, monkeypatch):
    """The per-document path runs (one sdpa call per document and layer) and gives the hidden
    states that sdpa with transformers' block-diagonal mask gives."""
    batch = collate_packed(ROWS, pad_id=0)
    model = tiny_model(kind).eval()
    with torch.no_grad():
        masked = model.get_decoder()(
            **batch.model_inputs(), use_cache=False
        ).last_hidden_state  # plain sdpa, masked
    loss_fn = LMLoss(model)
    assert loss_fn.packed_attention and model.config._attn_implementation == PACKED_SDPA

    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        per_doc = loss_fn.hidden_states(batch)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * sum(len(docs) for docs in batch.doc_lengths)
    real_positions = torch.arange(batch.input_ids.shape[1])[None] < torch.tensor(batch.row_lengths)[:, None]
    torch.testing.assert_close(per_doc[real_positions], masked[real_positions], atol=1e-5, rtol=1e-5)


def test_sliding_window_models_keep_the_masked_path(monkeypatch):
    model = tiny_model("mistral").eval()  # sliding window 4, shorter than the documents
    loss_fn = LMLoss(model)
    batch = collate_packed(ROWS, pad_id=0)
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        loss_fn.hidden_states(batch)
    assert len(calls) == model.config.num_hidden_layers  # one masked call per layer


def test_packed_attention_backward_matches_the_masked_row():
    batch = collate_packed(ROWS, pad_id=0)
    grads = []
    for packed in (True, False):
        model = tiny_model("llama")
        loss_fn = LMLoss(model)
        if not packed:
            loss_fn.packed_attention = False
            model.set_attn_implementation("sdpa")
        sums = loss_fn(batch)
        (sums.loss_sum / sums.num_trained).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_trained_positions_are_unchanged_by_the_attention_choice():
    """Loss per token, packed per document vs each example alone (the packing guarantee)."""
    loss_fn = LMLoss(tiny_model("llama").eval(), chunk_size=5)
    with torch.no_grad():
        packed = loss_fn(collate_packed(ROWS, pad_id=0), reduction="none").loss_sum
        alone = torch.cat(
            [loss_fn(collate_packed([[e]], pad_id=0), reduction="none").loss_sum for e in EXAMPLES]
        )
    assert alone.numel() == sum(sum(x != IGNORE_INDEX for x in labels[1:]) for _, labels in EXAMPLES)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# CPU bf16: a few matmul shapes only (oneDNN keeps a kernel and a packed weight per shape)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 1024, 1025, 3300, 5000])
@pytest.mark.parametrize("chunk", [1024, 4096])
def test_chunk_sizes_come_from_a_small_set(n, chunk):
    from exemplar.train.loss import _chunk_sizes

    assert sum(_chunk_sizes(n, chunk)) == n  # no rounding without a multiple
    sizes = _chunk_sizes(n, chunk, 64)
    assert n <= sum(sizes) < n + 64
    allowed = {chunk} | {64 << k for k in range(12) if 64 << k < chunk}
    assert set(sizes) <= allowed


def test_bf16_chunks_padded_with_zero_rows_give_the_plain_result():
    hidden, weight, _, targets = _leaves(n=150, d=32, vocab=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, None, targets, chunk_size=64)  # 64+64+22(+42)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(
        F.linear(hidden.bfloat16(), weight.bfloat16()).float(), targets, reduction="sum"
    )
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-3, atol=1e-2)
    for got, want in zip(grads, (hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_bf16_rows_are_widened_to_a_multiple_of_64():
    model = tiny_model("llama")
    loss_fn = LMLoss(model)
    batch = collate_packed(ROWS, pad_id=0)  # rows of 14 or fewer tokens
    widths = []
    model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        plain = loss_fn.hidden_states(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            widened = loss_fn.hidden_states(batch)
    assert widths == [batch.input_ids.shape[1], 64]
    assert widened.shape == plain.shape
    real = torch.arange(batch.input_ids.shape[1])[None] < torch.tensor(batch.row_lengths)[:, None]
    torch.testing.assert_close(widened[real].float(), plain[real], rtol=0.05, atol=0.05)
