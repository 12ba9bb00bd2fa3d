"""AdamW and the learning-rate schedule.

The learning rate is a pure function of the step (no scheduler object with hidden state), so a
resumed run gets it right by construction; `schedule_state` records the inputs for inspection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from exemplar.config import TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters: weight decay on matrices only (not on norms and biases).

    Fused on CUDA, foreach (multi-tensor) elsewhere. Groups are built in `named_parameters` order,
    which is what makes a saved optimizer state load back onto the same parameters.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=train.resolved_lr(),
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total_steps)
    return math.ceil(train.warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, train: TrainConfig) -> float:
    """Learning rate for the optimizer step with 0-based index `step`.

    Linear warmup from lr/warmup up to lr (so the first step already learns), then cosine, linear
    or constant decay from lr towards lr * min_lr_ratio, which would be reached one step after the
    last (so the last step is not wasted at lr 0).
    """
    base = train.resolved_lr()
    warmup = warmup_steps(train, total_steps)
    if step < warmup:
        return base * (step + 1) / warmup
    if train.lr_scheduler == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    cosine = train.lr_scheduler == "cosine"
    factor = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
    floor = train.min_lr_ratio
    return base * (floor + (1.0 - floor) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_state(train: TrainConfig, total_steps: int) -> dict:
    return {
        "kind": train.lr_scheduler,
        "base_lr": train.resolved_lr(),
        "min_lr_ratio": train.min_lr_ratio,
        "warmup_steps": warmup_steps(train, total_steps),
        "total_steps": total_steps,
    }
