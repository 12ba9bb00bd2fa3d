"""Next-token cross-entropy over trained positions only, without the [B, L, vocab] logits.

The model body (the decoder, e.g. `LlamaModel`) gives hidden states; we keep only the positions
whose next label is trained, and run the output layer + cross-entropy on them in chunks of
`chunk_size` positions. Prompt positions never touch the (often 150k-wide) output layer.

When training through a plain `nn.Linear` head (the usual case), the loss is a fused linear
cross-entropy (`_FusedLinearCrossEntropy`): each chunk's logits are computed once, turned in place
into their gradient (softmax minus one-hot), and multiplied straight into the gradients of the
hidden states and of the head, so the logits are never kept, never recomputed, and no
[positions, vocab] log-softmax or one-hot gradient tensor is ever built. Memory is one chunk of
logits. Other heads (LoRA-wrapped, hooked, sharded) use the plain chunked path, which recomputes
each chunk's logits in backward when there are several chunks.

The loss of an optimizer step is sum(token CE) / (trained tokens in the whole step), so it does not
depend on how the step is split into micro-batches (or, later, ranks). `LMLoss.forward` therefore
returns the SUM; the caller divides by the step's token count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from exemplar.data.schema import IGNORE_INDEX
from exemplar.model.lora import unwrap_peft
from exemplar.train.attention import DOCS_KWARG, use_packed_attention
from exemplar.train.batch import Batch

log = logging.getLogger(__name__)


# Matmul shapes on the CPU in bf16/fp16 are rounded up to multiples of this (see hidden_states).
_SHAPE_MULTIPLE = 64


def _low_precision_cpu(device: torch.device, head: nn.Module | None) -> bool:
    if device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (
        torch.bfloat16,
        torch.float16,
    ):
        return True
    weight = getattr(head, "weight", None)
    return weight is not None and weight.dtype in (torch.bfloat16, torch.float16)


def _widen(inputs: dict[str, torch.Tensor | None], pad: int) -> dict[str, torch.Tensor | None]:
    """`pad` more columns on every row: a padding document of its own (positions from 0)."""
    ids, positions = inputs["input_ids"], inputs["position_ids"]
    rows = ids.shape[0]
    return {
        **inputs,
        "input_ids": torch.cat([ids, ids.new_zeros(rows, pad)], dim=1),
        "position_ids": torch.cat(
            [positions, torch.arange(pad, device=positions.device).expand(rows, pad)], dim=1
        ),
    }


@dataclass
class LossSums:
    loss_sum: torch.Tensor  # scalar: sum of token cross-entropies (differentiable)
    num_trained: int
    num_correct: torch.Tensor | None  # argmax hits on trained tokens (only when asked)


class LMLoss(nn.Module):
    """Wraps a causal LM (optionally PEFT-wrapped) and computes summed token losses for a batch.

    A module (not a function) so that a later data-parallel wrapper can wrap it as a whole.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.packed_attention = use_packed_attention(model)
        lm = unwrap_peft(model)
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
        head = lm.get_output_embeddings()
        # Without a separate body and head (an unusual architecture), use the model's full logits.
        self.full_logits = body is lm or head is None
        self.body = None if self.full_logits else body
        self.head = head
        config = lm.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.softcap: float | None = getattr(text_config, "final_logit_softcapping", None)
        # Multipliers some families apply to the logits after the head (Granite, Cohere).
        scale = 1.0
        if getattr(text_config, "logits_scaling", None):
            scale /= float(text_config.logits_scaling)
        if getattr(text_config, "logit_scale", None) and "cohere" in (text_config.model_type or ""):
            scale *= float(text_config.logit_scale)
        self.logit_scale = scale

    # -- pieces --------------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer plus whatever the model's own forward does to its logits, in fp32."""
        logits = self.head(hidden).float()
        if not torch.is_grad_enabled():  # no graph (evaluation): one [n, vocab] tensor, not one per step
            if self.logit_scale != 1.0:
                logits.mul_(self.logit_scale)
            if self.softcap:
                logits.div_(self.softcap).tanh_().mul_(self.softcap)
            return logits
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        inputs = batch.model_inputs()
        extra = {}
        width = batch.input_ids.shape[1]
        pad = 0
        if self.packed_attention and batch.doc_lengths is not None and batch.attention_mask is None:
            docs = batch.doc_lengths
            if _low_precision_cpu(batch.input_ids.device, self.head):
                # oneDNN keeps a kernel (and memory) per matmul shape: widen the rows to a multiple
                # of 64 with one more padding document, so shapes repeat from step to step.
                pad = -width % _SHAPE_MULTIPLE
                if pad:
                    inputs = _widen(inputs, pad)
                    docs = [[*row, pad] for row in docs]
            extra[DOCS_KWARG] = docs
        out = self.body(**inputs, use_cache=False, **extra)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, :width] if pad else hidden

    # -- forward -------------------------------------------------------------------------------

    def forward(self, batch: Batch, with_accuracy: bool = False, reduction: str = "sum") -> LossSums:
        targets_all = batch.labels[:, 1:]
        trained = targets_all != IGNORE_INDEX
        targets = targets_all[trained]
        if self.full_logits:
            logits = self.model(**batch.model_inputs(), use_cache=False).logits.float()
            return _cross_entropy(logits[:, :-1][trained], targets, with_accuracy, reduction)
        hidden = self.hidden_states(batch)[:, :-1][trained]  # [N, d]: only positions with a target
        return self.chunked_cross_entropy(hidden, targets, with_accuracy, reduction)

    def chunked_cross_entropy(
        self, hidden: torch.Tensor, targets: torch.Tensor, with_accuracy: bool, reduction: str
    ) -> LossSums:
        n = targets.numel()
        if n > 0 and reduction == "sum" and self._can_fuse(hidden):
            loss_sum, correct = fused_linear_cross_entropy(
                hidden,
                self.head.weight,
                self.head.bias,
                targets,
                chunk_size=self.chunk_size,
                logit_scale=self.logit_scale,
                softcap=self.softcap,
                with_accuracy=with_accuracy,
            )
            return LossSums(loss_sum, n, correct)
        if n == 0:  # keep the graph connected so backward works on an all-prompt micro-batch
            shape = (0,) if reduction == "none" else ()
            zero = hidden.sum() * 0.0 if reduction != "none" else hidden.new_zeros(shape, dtype=torch.float32)
            correct = torch.zeros(shape, dtype=torch.long, device=hidden.device) if with_accuracy else None
            return LossSums(zero, 0, correct)
        recompute = torch.is_grad_enabled() and n > self.chunk_size
        parts: list[LossSums] = []
        for start in range(0, n, self.chunk_size):
            h, t = hidden[start : start + self.chunk_size], targets[start : start + self.chunk_size]
            if recompute:  # don't keep [chunk, vocab] logits per chunk; redo them in backward
                parts.append(checkpoint(self._chunk, h, t, with_accuracy, reduction, use_reentrant=False))
            else:
                parts.append(self._chunk(h, t, with_accuracy, reduction))
        cat = torch.cat if reduction == "none" else lambda xs: torch.stack(xs).sum()
        correct = cat([p.num_correct for p in parts]) if with_accuracy else None
        return LossSums(cat([p.loss_sum for p in parts]), n, correct)

    def _can_fuse(self, hidden: torch.Tensor) -> bool:
        """The fused path needs a plain, unhooked `nn.Linear` head with ordinary tensors, and a graph."""
        head = self.head
        if not torch.is_grad_enabled() or type(head) is not nn.Linear:
            return False
        if not (hidden.requires_grad or head.weight.requires_grad):
            return False  # nothing to differentiate: the plain path is as cheap
        if head._forward_hooks or head._forward_pre_hooks:
            return False  # someone (FSDP, a test, a user) wants to see the head being called
        # Subclasses such as DTensor (FSDP2, tensor parallel) go through the module instead.
        return type(head.weight.data) is torch.Tensor and type(hidden.data) is torch.Tensor

    def _chunk(self, h: torch.Tensor, t: torch.Tensor, with_accuracy: bool, reduction: str) -> LossSums:
        return _cross_entropy(self.logits(h), t, with_accuracy, reduction)

    # -- sanity check --------------------------------------------------------------------------

    @torch.no_grad()
    def check_head(self, vocab_size: int | None = None, atol: float = 1e-3) -> bool:
        """Compare our logits with the model's own forward on a tiny input; on mismatch use full logits.

        Catches model families that post-process logits in ways this module does not know about.
        """
        if self.full_logits:
            return False
        lm = unwrap_peft(self.model)
        device = next(self.model.parameters()).device
        vocab = vocab_size or lm.config.get_text_config().vocab_size
        ids = torch.arange(1, 9, device=device)[None] % vocab
        was_training = self.model.training
        self.model.eval()
        try:
            expected = self.model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.body(input_ids=ids, use_cache=False)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            ok = torch.allclose(self.logits(hidden), expected, atol=atol, rtol=1e-3)
        finally:
            self.model.train(was_training)
        if not ok:
            log.warning(
                "%s: chunked loss does not match the model's logits; using full logits", type(lm).__name__
            )
            self.full_logits = True
        return ok


def _cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, with_accuracy: bool, reduction: str
) -> LossSums:
    """Cross-entropy of [n, vocab] logits that the caller owns (a fresh head output or copy):
    without a graph (evaluation) they are overwritten by their log-softmax."""
    correct = None
    if with_accuracy:
        hits = logits.detach().argmax(dim=-1) == targets
        correct = hits if reduction == "none" else hits.sum()
    if torch.is_grad_enabled():
        loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
    else:
        # F.cross_entropy would build a second [n, vocab] fp32 tensor (the log-softmax) beside
        # the logits: twice the memory of a training step's fused loss. Nothing needs the logits
        # afterwards, so the loss is computed in them.
        log_probs = logits.float()
        torch.log_softmax(log_probs, dim=-1, out=log_probs)  # in place (as in the fused path)
        loss = _reduce(-log_probs.gather(1, targets[:, None]).squeeze(1), reduction)
    return LossSums(loss, targets.numel(), correct)


def _reduce(token_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return token_loss
    if reduction == "sum":
        return token_loss.sum()
    if reduction == "mean":
        return token_loss.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', not {reduction!r}")


# ---------------------------------------------------------------------------------------------
# Fused linear cross-entropy


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    with_accuracy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i CE(softcap(scale * (hidden_i @ weight.T + bias)), targets_i), and the argmax hits.

    Differentiable in `hidden`, `weight` and `bias`. Under autocast the two matmuls of each chunk
    run in the autocast dtype, like `F.linear` would; the softmax and the loss are fp32.
    """
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    with torch.autocast(device_type, enabled=False):
        loss, correct = _FusedLinearCrossEntropy.apply(
            hidden, weight, bias, targets, chunk_size, logit_scale, softcap, compute_dtype, with_accuracy
        )
    return loss, correct


def _chunk_sizes(n: int, chunk_size: int, multiple: int = 1) -> list[int]:
    """Chunk sizes covering n rows: full chunks, then the rest. With multiple > 1 the rest is
    rounded up to a multiple of it and split into powers of two times it (binary digits), so
    every size comes from {chunk_size, multiple, 2 x multiple, 4 x multiple, ...}: a handful of
    shapes whatever n is, and fewer than `multiple` padding rows."""
    sizes = [chunk_size] * (n // chunk_size)
    rest = n - len(sizes) * chunk_size
    if rest == 0:
        return sizes
    if multiple <= 1 or chunk_size < multiple:
        return [*sizes, rest]
    units = -(-rest // multiple)
    bit = 1 << (units.bit_length() - 1)
    while bit:
        if units & bit:
            sizes.append(bit * multiple)
        bit >>= 1
    return sizes


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss AND its gradients chunk by chunk; backward only scales them.

    The output is a scalar (a sum), so the upstream gradient is one number g and every gradient is
    g x what forward already computed: grad_logits = softmax - onehot (per chunk, in place),
    grad_hidden = grad_logits @ W, grad_W = sum over chunks of grad_logits.T @ hidden.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, chunk_size, logit_scale, softcap, compute_dtype, with_accuracy
    ):
        n = hidden.shape[0]
        dtype = compute_dtype or weight.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device) if with_accuracy else None
        # oneDNN (CPU bf16/fp16 matmuls) keeps a kernel, with a packed copy of the weight, per
        # matmul shape: there, chunks take sizes from a small fixed set (see _chunk_sizes), the
        # last one topped up with zero rows that add nothing to the loss or any gradient.
        low_precision_cpu = dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu"
        start = 0
        for size in _chunk_sizes(n, chunk_size, _SHAPE_MULTIPLE if low_precision_cpu else 1):
            end = min(start + size, n)
            h = hidden[start:end].to(dtype)
            t = targets[start:end]
            rows = torch.arange(end - start, device=t.device)
            extra = size - (end - start)
            if extra:
                h = torch.cat([h, h.new_zeros(extra, h.shape[1])])
            z = F.linear(h, w, b).float()  # [c, vocab]: the only logits tensor, turned into its gradient
            if extra:
                z = z[: end - start]
            if logit_scale != 1.0:
                z.mul_(logit_scale)
            squash = None
            if softcap:
                z.div_(softcap).tanh_()
                squash = z.clone()  # tanh values, for the derivative 1 - tanh^2
                z.mul_(softcap)
            if with_accuracy:
                correct += (z.argmax(dim=-1) == t).sum()
            torch.log_softmax(z, dim=-1, out=z)  # in place, row by row
            loss -= z[rows, t].sum()
            z.exp_()  # softmax p; d loss / d logits = p - onehot(t)
            if squash is not None:  # the chain rule through the softcap is elementwise: apply it here
                z[rows, t] -= 1.0
                z.mul_(squash.square_().neg_().add_(1.0))
                del squash
            onehot = softcap is None or softcap == 0  # otherwise already subtracted above
            g = z.to(dtype)
            del z
            if extra:  # back to a size from the small set: zero rows contribute nothing
                g = torch.cat([g, g.new_zeros(extra, g.shape[1])])
            if need_h:
                gh = (g @ w)[: end - start] if extra else g @ w
                if onehot:
                    gh -= w[t]
                if logit_scale != 1.0:
                    gh.mul_(logit_scale)
                grad_h[start:end] = gh
            if need_w:  # (h's padding rows are zero: they add nothing)
                if g.dtype == torch.float32 and h.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h, alpha=logit_scale)
                else:
                    grad_w.add_((g.t() @ h).float(), alpha=logit_scale)
                if onehot:
                    grad_w.index_add_(0, t, h[: end - start].float(), alpha=-logit_scale)
            if need_b:
                grad_b.add_(g.float().sum(dim=0), alpha=logit_scale)
                if onehot:
                    grad_b.index_add_(0, t, torch.ones_like(t, dtype=torch.float32), alpha=-logit_scale)
            start = end
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (grad_h, grad_w, grad_b)))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if correct is not None:
            ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct=None):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.has
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        out_h = (grad_h * grad_loss).to(h_dtype) if need_h else None
        out_w = (grad_w * grad_loss).to(w_dtype) if need_w else None
        out_b = (grad_b * grad_loss).to(b_dtype) if need_b else None
        return out_h, out_w, out_b, None, None, None, None, None, None
