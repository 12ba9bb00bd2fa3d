"""Write the trained model where plain `transformers` (and vLLM) can load it, and merge LoRA adapters.

Layout under the run's output folder:

    OUTPUT/model/    full model: config.json, model.safetensors, tokenizer (with its chat template),
                     generation_config.json whose eos_token_id lists the end-of-turn token(s)
    OUTPUT/adapter/  LoRA runs: PEFT's adapter_config.json + adapter_model.safetensors, plus the
                     tokenizer and generation_config.json so `exemplar merge` can rebuild the model

Folders are written to a temporary sibling and renamed into place, so a crash mid-save never leaves
a half-written folder where a complete one is expected. A model trained on several ranks (FSDP2:
sharded) is first gathered into one ordinary model on rank 0 by `model_for_export`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel

from exemplar.config import ModelConfig, TrainConfig
from exemplar.errors import ExemplarError
from exemplar.fsio import atomic_write_json, disk_full_guard, fsync_dir, fsync_file, temp_dir_beside
from exemplar.model.lora import is_quantized, unwrap_peft
from exemplar.model.special_ids import pad_token_id

if TYPE_CHECKING:
    from exemplar.train.distributed import World

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


def save_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    stop_token_ids: list[int],
    merge: bool = False,
) -> dict[str, Path]:
    """Save a trained model under `out_dir`; return {"model": path, "adapter": path} for what was written.

    A full model goes to out_dir/model. A PEFT model goes to out_dir/adapter, and also merged to
    out_dir/model when `merge` is true; merging works on a copy, so `model` can keep training.
    """
    model = unwrap(model)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if not is_peft_model(model):
        written["model"] = _save_full(model, tokenizer, out_dir / MODEL_DIR, stop_token_ids)
        return written
    written["adapter"] = _save_adapter(model, tokenizer, out_dir / ADAPTER_DIR, stop_token_ids)
    if merge:
        if is_quantized(model):
            # Merging into 4-bit weights would round the merged result to 4 bits: reload the base in
            # full precision from where it came from and merge the saved adapter into that instead.
            base = model.peft_config[model.active_adapter].base_model_name_or_path
            written["model"] = merge_adapter(base, written["adapter"], out_dir / MODEL_DIR)
        else:
            merged = copy.deepcopy(model).merge_and_unload()
            written["model"] = _save_full(merged, tokenizer, out_dir / MODEL_DIR, stop_token_ids)
            del merged
    return written


def merge_adapter(
    base: str | Path | ModelConfig,
    adapter_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    stop_token_ids: list[int] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a saved LoRA adapter into its base model and write the full model folder to `out_dir`.

    `base` is the base model's folder or Hub id, or the `model:` config it was built from (a random
    init from `from_config` is rebuilt with the training `seed`). The tokenizer and the stop tokens
    come from the adapter folder when it has them (Exemplar saves both there).
    """
    from peft import PeftModel

    from exemplar.model.loading import (
        fit_embeddings_to_tokenizer,
        load_base_model,
        set_special_token_ids,
        special_token_ids,
    )

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExemplarError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    if isinstance(base, ModelConfig):
        model_cfg = base
    else:
        if not str(base):
            raise ExemplarError("the adapter does not record its base model: pass the base model explicitly")
        model_cfg = ModelConfig(path=str(base), trust_remote_code=trust_remote_code)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_cfg.path
    if tokenizer_source is None:
        raise ExemplarError(
            f"no tokenizer in {adapter_dir} and the base model has no folder to take one from"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_source), trust_remote_code=model_cfg.trust_remote_code
    )
    # Merge in fp32 (exact sum of base and low-rank update), then store in the base's own dtype.
    # The same token ids as in training: a random init depends on them (the pad row starts at zero).
    base_model = load_base_model(
        model_cfg,
        TrainConfig(method="full", seed=seed),
        dtype=torch.float32,
        token_ids=special_token_ids(tokenizer),
    )
    stored_dtype = getattr(base_model.config, "dtype", None)
    fit_embeddings_to_tokenizer(base_model, tokenizer)
    set_special_token_ids(base_model, tokenizer)
    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    if isinstance(stored_dtype, torch.dtype):
        merged = merged.to(stored_dtype)
    if stop_token_ids is None:
        stop_token_ids = _saved_stop_ids(adapter_dir)
    return _save_full(merged, tokenizer, Path(out_dir), stop_token_ids)


# ---------------------------------------------------------------------------------------------
# A model trained on several ranks, in one piece


def model_for_export(model: nn.Module, world: World) -> nn.Module | None:
    """On rank 0, a model that `save_model` can write as an ordinary Hugging Face folder; None elsewhere.

    Collective when the model is FSDP2-sharded: every rank must call it. The full state dict is
    gathered to rank 0's CPU one tensor at a time, then loaded into a fresh copy of the model built
    on the meta device (no second initialization). A DDP or single-process model is returned as is.
    """
    if not is_sharded(model):
        return model if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    quantized = is_quantized(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=quantized)
    state = get_model_state_dict(model, options=options)
    if not world.is_main:
        return None
    if quantized:
        return _unshard_in_place(model, state)
    return _plain_copy(model, state)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds FSDP2-sharded parameters (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    from peft import PeftModel, get_peft_model

    lm = unwrap_peft(model)
    config = copy.deepcopy(lm.config)
    with torch.device("meta"):
        fresh = type(lm)._from_config(config)  # the class itself: remote-code models included
        if isinstance(model, PeftModel):
            adapter = model.active_adapter
            fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config[adapter]), adapter_name=adapter)
    result = fresh.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ExemplarError(f"gathered weights do not fit the model: {', '.join(result.unexpected_keys[:5])}")
    # Non-persistent buffers (rotary tables) are not in the state dict: take them from the original.
    originals = dict(model.named_buffers())
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta and name in originals:
            module_name, _, attr = name.rpartition(".")
            owner = fresh.get_submodule(module_name) if module_name else fresh
            persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
            owner.register_buffer(attr, originals[name].detach().to("cpu").clone(), persistent=persistent)
    base = unwrap_peft(fresh)
    if hasattr(base, "tie_weights"):
        base.tie_weights()
    still_meta = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if still_meta:
        raise ExemplarError(f"gathered weights lack {', '.join(still_meta[:5])}")
    if getattr(lm, "generation_config", None) is not None:
        base.generation_config = copy.deepcopy(lm.generation_config)
    base.name_or_path = getattr(lm, "name_or_path", "")
    return fresh.eval()


def _unshard_in_place(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """QLoRA: swap the sharded trainable (adapter) weights for their gathered full values, on rank 0.

    The 4-bit base stays as loaded (it was never sharded). The model cannot train afterwards.
    """
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params:
            continue
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        setattr(owner, attr, nn.Parameter(value.to(params[name].device), requires_grad=False))
    return model


# ---------------------------------------------------------------------------------------------


def export_generation_config(
    model: torch.nn.Module, tokenizer: Any, stop_token_ids: list[int]
) -> GenerationConfig:
    """The model's generation config with eos_token_id = the template's stop tokens + the tokenizer's eos.

    `generate` (and vLLM) stop at any id in the list; with only the tokenizer's eos a chat model runs
    past its end-of-turn token and writes the next turn itself.
    """
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(model.config)
    eos = _unique([*stop_token_ids, tokenizer.eos_token_id])
    config.eos_token_id = eos if len(eos) != 1 else eos[0]
    pad = pad_token_id(tokenizer, stop_token_ids, default=None)
    if pad is not None:
        config.pad_token_id = pad
    return config


@contextlib.contextmanager
def atomic_dir(final: str | Path, needed: Callable[[], int] = lambda: 0) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final`, on error it is
    removed (a full disk is a clear error with the space `needed`, in bytes, and free).

    The old folder is renamed aside before the new one is renamed in and deleted only afterwards,
    so at every moment one complete copy exists on disk (`final` or the renamed old one). The files
    and folders are fsynced before and after the renames, as `exemplar.fsio` does for files.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(final)
    with disk_full_guard(str(final), final.parent, needed, cleanup=tmp, hint="the previous copy is intact"):
        yield tmp
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------


def _save_full(model: PreTrainedModel, tokenizer: Any, final: Path, stop_token_ids: list[int]) -> Path:
    generation = export_generation_config(model, tokenizer, stop_token_ids)
    with atomic_dir(final, lambda: _weight_bytes(model)) as tmp, _cache_enabled(model):
        model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
        generation.save_pretrained(tmp)
        _save_tokenizer(tokenizer, tmp)
    return final


def _save_adapter(model: torch.nn.Module, tokenizer: Any, final: Path, stop_token_ids: list[int]) -> Path:
    base = model.get_base_model()
    generation = export_generation_config(base, tokenizer, stop_token_ids)
    with atomic_dir(final, lambda: _weight_bytes(model, trainable_only=True)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        _save_tokenizer(tokenizer, tmp)
    return final


def _weight_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """About what the weights take on disk (the tokenizer's few MB aside)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(p.numel() * p.element_size() for p in params)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # transformers 5 names generic fast tokenizers "TokenizersBackend", a class older transformers
    # (and so older vLLM) cannot find; the equivalent old name loads everywhere.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_json(path, config, sort_keys=True)


@contextlib.contextmanager
def _cache_enabled(model: PreTrainedModel) -> Iterator[None]:
    """Save with use_cache=true (training may have turned the KV cache off for checkpointing)."""
    previous = getattr(model.config, "use_cache", None)
    if previous is not None:
        model.config.use_cache = True
    try:
        yield
    finally:
        if previous is not None:
            model.config.use_cache = previous


def _saved_stop_ids(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


def _unique(ids: list[int | None]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return out
