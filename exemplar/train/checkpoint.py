"""Atomic checkpoints under OUTPUT/checkpoints/step-000123/, and resuming from the newest one.

A checkpoint is written into a hidden temporary sibling folder, every file is fsynced, and the
folder is renamed into place: a folder named `step-NNNNNN` is always complete, whatever moment a
run is killed at. Contents:

  model.safetensors    trainable weights (LoRA: adapter weights only; full: the whole state dict)
  optimizer.pt         AdamW state
  scheduler.json       learning-rate schedule inputs (the rate itself is a function of the step)
  rng.pt               python, numpy, torch CPU and CUDA generator states, as tensors and plain values
  trainer_state.json   step, epoch, position in the plan, config hash, running totals, metrics
  manifest.json        size and SHA-256 of every other file; written last, so its presence marks a
                       complete checkpoint, and checked before anything is loaded

Nothing in a checkpoint executes code when loaded: weights are safetensors, every `.pt` file is read
with `weights_only=True` (tensors and plain values only), and the pickled metadata of a sharded
checkpoint is vetted against an allowlist before `torch.distributed.checkpoint` reads it. A
checkpoint whose files do not match its manifest (truncated, corrupted, tampered) is reported and
skipped: `--resume` goes on from the newest one that checks out.

Runs on several ranks (torchrun) write a sharded checkpoint with `torch.distributed.checkpoint`
instead: every rank writes its own shards of the weights and optimizer state in parallel.

  dcp/                 {"model": trainable weights, "optimizer": AdamW state}, keyed by parameter
                       name; loads onto any number of ranks (resharded on load), or one process
  rng-rank{R}.pt       each rank's generator states
  scheduler.json, trainer_state.json, manifest.json   as above (written by rank 0)

`load_checkpoint` reads either format into a single-process or a distributed model, so a run can
resume on a different number of ranks than it was saved from.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from exemplar.errors import ExemplarError
from exemplar.fsio import atomic_write_json, disk_full_guard, fsync_dir, fsync_file, is_disk_full

if TYPE_CHECKING:
    from exemplar.train.distributed import World

STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"
SHARDED_DIR = "dcp"
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


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
    """Every generator's state as tensors and plain values, so it loads with `weights_only=True`."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_pt(path: Path, map_location: Any = "cpu") -> Any:
    """A `.pt` file of a checkpoint, read without executing code (tensors and plain values only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ExemplarError(
            f"{path}: refusing to load: it holds objects other than tensors and plain values, which "
            f"could run code (a checkpoint from another source, or from an older Exemplar). Details: {e}"
        ) from None


# How a step is split over micro-batches and ranks does not change what is trained (the loss is
# normalised per step); the global batch itself is checked separately on resume.
SPLIT_KEYS = {"micro_batch_size", "grad_accum", "distributed", "cpu_offload_optimizer"}


def config_hash(config: Any) -> str:
    """Hash of the settings that define a run (paths to outputs and the step's split excluded)."""
    data = config.model_dump(mode="json", exclude={"output_dir", "base_dir"})
    for key in SPLIT_KEYS:
        data.get("train", {}).pop(key, None)
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
    world: World | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `root` and return its folder.

    With several ranks (`world.distributed`) every rank must call this: it writes a sharded
    checkpoint (see the module docstring); `model` is the transformers/PEFT model inside the wrapper.
    """
    if world is not None and world.distributed:
        return _save_sharded(root, step, model, optimizer, schedule, trainer_state, world)
    final = root / step_dir_name(step)
    tmp = _empty_tmp(root, f"{TMP_PREFIX}{final.name}-{os.getpid()}")
    hint = "keep fewer checkpoints with train.keep_last, or free some space, and resume"
    with disk_full_guard(
        f"checkpoint {final}", final.parent, lambda: _state_bytes(model, optimizer), tmp, hint
    ):
        save_file(trainable_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        atomic_write_json(tmp / "scheduler.json", schedule, sort_keys=True)
        atomic_write_json(tmp / "trainer_state.json", trainer_state, sort_keys=True)
        _write_manifest(tmp)  # last: its presence marks completeness
        _publish(tmp, final)
    return final


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    weights = sum(t.numel() * t.element_size() for t in trainable_state_dict(model).values())
    moments = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    return weights + moments


def _empty_tmp(root: Path, name: str) -> Path:
    """A fresh, empty temporary folder under root (a killed run's leftover of that name removed)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary checkpoint folder the checkpoint: its files and the folder
    synced, then renamed into place (a step saved again, e.g. the last one after a resume, moves
    the old folder aside first)."""
    for f in tmp.iterdir():
        if f.is_file():
            fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        _discard(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): _file_entry(p) for p in files}
    atomic_write_json(folder / MANIFEST, {"format": 1, "files": entries}, sort_keys=True)


def _file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted to load (None when every file matches its
    manifest): a missing or unreadable manifest, a missing, truncated or changed file."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
        if not isinstance(entries, dict) or not entries:
            return f"{MANIFEST} lists no files"
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by an older Exemplar)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, expected in sorted(entries.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected.get('size')} (truncated?)"
        if _file_entry(file)["sha256"] != expected.get("sha256"):
            return f"{name} does not match its checksum (corrupted or changed)"
    return None


def _save_sharded(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: dict[str, Any],
    trainer_state: dict[str, Any],
    world: World,
) -> Path:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-ranks"  # the same folder on every rank
    if world.is_main:
        _empty_tmp(root, tmp.name)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))

    def write_shards() -> None:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))
        rng_file = tmp / f"rng-rank{world.rank}.pt"
        torch.save(rng_state(), rng_file)
        fsync_file(rng_file)

    # Every rank's shards and RNG file are on disk, or every rank raises the same error.
    _on_every_rank_or_none(
        write_shards, final, lambda: _sharded_bytes(root, [model_state, optim_state]), tmp, world
    )
    if world.is_main:
        hint = "keep fewer checkpoints with train.keep_last, or free some space, and resume"
        with disk_full_guard(f"checkpoint {final}", root, lambda: _size_of(tmp), tmp, hint):
            atomic_write_json(tmp / "scheduler.json", schedule, sort_keys=True)
            atomic_write_json(
                tmp / "trainer_state.json",
                {**trainer_state, "format": "sharded", "world_size": world.world_size},
                sort_keys=True,
            )
            _write_manifest(tmp)
            _publish(tmp, final)
    # Nobody goes on (and prunes or resumes) before the folder is in place; a failure of rank 0
    # above reaches the others as a broken barrier when its process exits.
    dist.barrier()
    return final


def _on_every_rank_or_none(write, final: Path, needed, tmp: Path, world: World) -> None:
    """Run this rank's part of a sharded save. A rank that fails (a full disk, most often) would
    leave the others waiting at the next collective, so the outcome is shared first: then every
    rank raises, a full disk as the clear message naming the checkpoint and the space needed
    (the same on every rank), and rank 0 removes the partial folder. The previous checkpoints
    are not touched."""
    import torch.distributed as dist

    try:
        write()
        error = None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # shared with the other ranks below, then raised
        error = e  # (DCP's CheckpointException is a BaseException)
    full = error is not None and is_disk_full(_first_cause(error), final.parent, needed)
    outcomes: list[Any] = [None] * world.world_size
    dist.all_gather_object(outcomes, (error is not None, full, None if error is None else str(error)[:500]))
    if not any(failed for failed, _, _ in outcomes):
        return
    dist.barrier()  # every rank has stopped writing before the folder goes
    hint = "keep fewer checkpoints with train.keep_last, or free some space, and resume"

    def raise_outcome() -> None:
        with disk_full_guard(
            f"checkpoint {final}", final.parent, needed, tmp if world.is_main else None, hint
        ):
            if any(full for _, full, _ in outcomes):
                raise OSError(errno.ENOSPC, f"no space left on device on a rank writing {tmp}")
            if error is not None:
                raise error
            rank, message = next((r, m) for r, (failed, _, m) in enumerate(outcomes) if failed)
            raise ExemplarError(f"rank {rank} failed while writing checkpoint {final}: {message}")

    # Rank 0 removes the partial folder first, so every rank reports the same free space.
    if world.is_main:
        try:
            raise_outcome()
        finally:
            dist.barrier()
    dist.barrier()
    raise_outcome()


def _first_cause(error: BaseException) -> BaseException:
    """DCP gathers every rank's exception into one CheckpointException (`failures`: rank ->
    (exception, traceback)); the first rank's own exception says what happened."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        if isinstance(cause, tuple) and cause and isinstance(cause[0], BaseException):
            return cause[0]
    return error


def _sharded_bytes(root: Path, states: list[Any]) -> int:
    """About what a sharded checkpoint takes: the newest one's size (the same model and
    optimizer), or else the tensors' bytes."""
    done = list_checkpoints(root)
    return _size_of(done[-1][1]) if done else _tensor_bytes(states)


def _tensor_bytes(states: list[Any]) -> int:
    """Bytes of every tensor in nested state dicts."""
    total = 0
    for state in states:
        if isinstance(state, torch.Tensor):
            total += state.numel() * state.element_size()
        elif isinstance(state, dict):
            total += _tensor_bytes(list(state.values()))
        elif isinstance(state, (list, tuple)):
            total += _tensor_bytes(list(state))
    return total


def _size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _state_options(model: nn.Module, strict: bool = True, full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only the trainable (adapter) weights; the frozen base comes from the model's source.
    return StateDictOptions(
        ignore_frozen_params=not is_full_finetune(model), strict=strict, full_state_dict=full
    )


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


# ---------------------------------------------------------------------------------------------
# Finding and loading


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; newer ones that do not (a truncated
    or corrupted file, a folder without a manifest) are reported and skipped, never loaded."""
    candidates = [p for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir()] if root.is_dir() else []
    for path in sorted(candidates, key=lambda p: int(STEP_RE.match(p.name).group(1)), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World | None = None
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from `path`; return its trainer state.

    Either format loads into either kind of run: a sharded checkpoint into one process or any
    number of ranks, a single-process one into ranks (every rank must call this then).
    """
    distributed = world is not None and world.distributed
    if (path / SHARDED_DIR).is_dir():
        _load_sharded(path, model, optimizer)
        rank = world.rank if distributed else 0
        rng_file = path / f"rng-rank{rank}.pt"
        if not rng_file.is_file():  # more ranks than saved it: their streams cannot be continued
            rng_file = path / "rng-rank0.pt"
    elif distributed:
        _load_full_into_ranks(path, model, optimizer)
        rng_file = path / "rng.pt"
    else:
        load_trainable_state_dict(model, path / "model.safetensors")
        device = next(model.parameters()).device
        optimizer.load_state_dict(_load_pt(path / "optimizer.pt", map_location=device))
        rng_file = path / "rng.pt"
    set_rng_state(_load_pt(rng_file))
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The state dicts of this model and optimizer, as they are sharded now, are the templates
    # the checkpoint is read (and resharded) into.
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
    state = {"model": model_state, "optimizer": optim_state}
    vet_sharded_metadata(path / SHARDED_DIR / ".metadata")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    except Exception as e:  # DCP reports a missing key or a shape mismatch in many ways
        raise ExemplarError(f"{path}: the checkpoint does not match this model and optimizer: {e}") from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_state_options(model, strict=False),
    )


def _load_full_into_ranks(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A single-process checkpoint into a distributed model: every rank reads the files and keeps
    its own shards (FSDP2) or the whole (DDP)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights = load_file(str(path / "model.safetensors"))
    names = dict(model.named_parameters())
    unexpected = [k for k in weights if k not in names and k not in dict(model.named_buffers())]
    if unexpected:
        raise ExemplarError(
            f"{path}: checkpoint weights do not match this model (unexpected: {', '.join(unexpected[:5])})"
        )
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(names)
    missing = [n for n, p in names.items() if p.requires_grad and n not in weights and n not in tied]
    if missing:
        raise ExemplarError(f"{path}: checkpoint lacks trainable weights: {', '.join(missing[:5])}")
    set_model_state_dict(model, weights, options=_state_options(model, strict=False, full=True))
    # optimizer.pt numbers parameters in the optimizer's order; the distributed API wants names.
    saved = _load_pt(path / "optimizer.pt")
    name_of = {id(p): n for n, p in names.items()}
    order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_state_options(model, full=True))


# torch.distributed.checkpoint reads its `.metadata` file with plain `pickle.load`, which runs any
# code the file names. There is no public switch for a safe load, so before DCP reads it we unpickle
# it ourselves with a restricted Unpickler (the standard-library way to vet a pickle) that allows
# only the metadata types DCP writes; anything else is refused and DCP never sees the file.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = getattr(torch, name, None) if module == "torch" else None
        if module in _DCP_MODULES or (module, name) in _DCP_NAMES or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def vet_sharded_metadata(path: Path) -> None:
    """Refuse a sharded checkpoint whose pickled metadata names anything but DCP's own types."""
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise ExemplarError(f"{path}: missing: not a complete sharded checkpoint") from None
    except Exception as e:  # a refused global, or a file that is not a pickle at all
        raise ExemplarError(f"{path}: refusing to load: {e}") from None
