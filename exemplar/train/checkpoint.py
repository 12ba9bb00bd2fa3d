"""Atomic checkpoints under OUTPUT/checkpoints/step-000123/, and resuming from the newest one.

A checkpoint is written into a hidden temporary sibling folder, every file is fsynced, and the
folder is renamed into place: a folder named `step-NNNNNN` is always complete, whatever moment a
run is killed at. Contents:

  model.safetensors    trainable weights (LoRA: adapter weights only; full: the whole state dict)
  optimizer.pt         AdamW state
  scheduler.json       learning-rate schedule inputs (the rate itself is a function of the step)
  rng.pt               python, numpy, torch CPU and CUDA generator states
  trainer_state.json   step, epoch, position in the plan, config hash, running totals, metrics
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from exemplar.errors import ExemplarError

STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# What to save


def is_full_finetune(model: nn.Module) -> bool:
    return all(p.requires_grad for p in model.parameters())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fine-tuning: the state dict (tied weights once). Otherwise: trainable parameters only."""
    if is_full_finetune(model):
        items = model.state_dict().items()
    else:
        items = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in items:
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:  # a tied weight (e.g. lm_head = embeddings): safetensors refuses shared storage
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def load_trainable_state_dict(model: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ExemplarError(
            f"{path}: checkpoint weights do not match this model "
            f"(unexpected: {', '.join(result.unexpected_keys[:5])})"
        )
    missing_trainable = [
        n for n, p in model.named_parameters() if p.requires_grad and n in result.missing_keys
    ]
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing_trainable = [n for n in missing_trainable if n not in tied]
    if missing_trainable:
        raise ExemplarError(f"{path}: checkpoint lacks trainable weights: {', '.join(missing_trainable[:5])}")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_hash(config: Any) -> str:
    """Hash of the settings that define a run (paths to outputs excluded)."""
    data = config.model_dump(mode="json", exclude={"output_dir", "base_dir"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write checkpoint `step` atomically under `root` and return its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    _write_json(tmp / "scheduler.json", schedule)
    _write_json(tmp / "trainer_state.json", trainer_state)  # last: its presence marks completeness
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the last one after a resume): move the old one aside
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def prune_checkpoints(root: Path, keep_last: int, keep: set[int] | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and the steps in `keep`."""
    checkpoints = list_checkpoints(root)
    protected = {step for step, _ in checkpoints[-keep_last:]} | (keep or set())
    for step, path in checkpoints:
        if step not in protected:
            _discard(path)


def remove_stale(root: Path) -> None:
    """Remove temporary and half-deleted folders left by a killed run (ours, by name only)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path) -> None:
    # Rename first (atomic), so an interrupted delete never leaves a half folder named step-N.
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Finding and loading


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from `path`; return its trainer state."""
    load_trainable_state_dict(model, path / "model.safetensors")
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    # Our own file with numpy/python RNG tuples inside, hence weights_only=False.
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
