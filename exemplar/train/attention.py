"""Attention for packed rows: one causal sdpa call per document on the CPU, and the flash rule.

A packed row holds several documents (see `exemplar.train.batch`). transformers isolates them
itself (a block-diagonal mask from restarting position ids); what this module adds is speed on
the CPU, where one masked call computes every block of the row, and the rule that flash backends
need the batch flattened to one row.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from exemplar.model.lora import unwrap_peft

log = logging.getLogger(__name__)

PACKED_SDPA = "exemplar_packed_sdpa"
DOCS_KWARG = "exemplar_doc_lengths"


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, run one document at a time for packed CPU batches.

    A packed row holds several documents; transformers gives sdpa a block-diagonal mask for it,
    and the CPU kernels then compute every block of the row, most of them masked out. Given the
    documents' lengths (the `exemplar_doc_lengths` keyword, passed by `LMLoss` for packed
    batches), each document gets its own causal attention instead: the same result, about a third
    of the work on typical rows. Everything else (padded batches, generation, sliding windows,
    GPUs, which prefer one masked call to many small ones) is plain sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    docs = kwargs.pop(DOCS_KWARG, None)
    plain = (
        docs is None
        or query.device.type != "cpu"
        or query.shape[2] != key.shape[2]  # a cache: not a training forward
        or kwargs.get("sliding_window") is not None
        or getattr(module, "sliding_window", None) is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or len(docs) != query.shape[0]
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs["is_causal"] = True
    for b, lengths in enumerate(docs):
        if sum(lengths) != query.shape[2]:
            raise ValueError(f"document lengths of row {b} sum to {sum(lengths)}, not {query.shape[2]}")
    # split (not slicing in a loop): its backward is one concatenation, not a zero-filled
    # full-size gradient per document
    rows = []
    for q, k, v, lengths in zip(query.split(1), key.split(1), value.split(1), docs, strict=True):
        parts = [
            sdpa_attention_forward(module, qd, kd, vd, None, **kwargs)[0]  # [1, n, heads, head_dim]
            for qd, kd, vd in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a model on plain sdpa to `packed_sdpa_attention_forward` (registered with
    transformers' AttentionInterface; identical to sdpa unless given document lengths)."""
    lm = unwrap_peft(model)
    config = getattr(lm, "config", None)
    if getattr(config, "_attn_implementation", None) == PACKED_SDPA:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(lm, "set_attn_implementation"):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
        lm.set_attn_implementation(PACKED_SDPA)
    except Exception as e:  # an architecture that cannot switch: keep sdpa with its masks
        log.debug("packed attention not available for %s: %s", type(lm).__name__, e)
        return False
    return config._attn_implementation == PACKED_SDPA


def needs_flat_batches(model: nn.Module) -> bool:
    """Flash-attention backends isolate packed documents only within a single row (varlen)."""
    impl = getattr(unwrap_peft(model).config, "_attn_implementation", None) or ""
    return "flash" in impl
