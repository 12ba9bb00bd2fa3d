"""The compute precision of training and evaluation: autocast or not."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh autocast context per use: bf16 on GPU under `auto`, fp32 on CPU unless `bf16`."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
