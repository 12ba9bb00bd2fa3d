"""Next-token cross-entropy over trained positions only, without the [B, L, vocab] logits.

The model body (the decoder, e.g. `LlamaModel`) gives hidden states; we keep only the positions
whose next label is trained, and run the output layer + cross-entropy on them in chunks of
`chunk_size` positions. Prompt positions never touch the (often 150k-wide) output layer, and with
several chunks each chunk's logits are recomputed in backward instead of kept, so memory is
bounded by one chunk.

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

from exemplar.data.packing import Batch
from exemplar.data.schema import IGNORE_INDEX

log = logging.getLogger(__name__)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def needs_flat_batches(model: nn.Module) -> bool:
    """Flash-attention backends isolate packed documents only within a single row (varlen)."""
    impl = getattr(unwrap_peft(model).config, "_attn_implementation", None) or ""
    return "flash" in impl


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
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        out = self.body(**batch.model_inputs(), use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

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
    loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
    correct = None
    if with_accuracy:
        hits = logits.detach().argmax(dim=-1) == targets
        correct = hits if reduction == "none" else hits.sum()
    return LossSums(loss, targets.numel(), correct)
