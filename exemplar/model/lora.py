"""LoRA and QLoRA through PEFT's public API.

QLoRA needs CUDA and bitsandbytes; `check_method_supported` says so before any data or model work
starts, so a user does not wait for preprocessing to learn that the run cannot happen.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from exemplar.config import TrainConfig
from exemplar.errors import ExemplarError


def check_method_supported(train_cfg: TrainConfig) -> None:
    """Raise ExemplarError when this machine cannot run `train_cfg.method`. Cheap; call it first."""
    if train_cfg.method != "qlora":
        return
    if not torch.cuda.is_available():
        raise ExemplarError(
            "train.method=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels), and none is available. "
            "Use train.method=lora (same adapters, unquantized base) or run on a machine with a GPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ExemplarError(
            "train.method=qlora needs the bitsandbytes package: pip install 'exemplar-sft[qlora]' "
            "(or pip install bitsandbytes), or use train.method=lora."
        )


def quantization_config() -> Any:
    """4-bit NF4 with double quantization and bf16 compute: the QLoRA paper's recipe."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` holds quantized (QLoRA's 4-bit) weights: the one check for it everywhere.

    transformers marks the model it quantized (`is_quantized`, `is_loaded_in_4bit`/`8bit`); a PEFT,
    loss or data-parallel wrapper holds that model as a submodule, so every module is asked.
    """
    return any(
        getattr(m, "is_loaded_in_4bit", False) is True
        or getattr(m, "is_loaded_in_8bit", False) is True
        or getattr(m, "is_quantized", False) is True
        for m in model.modules()
    )


def apply_lora(model: torch.nn.Module, train_cfg: TrainConfig, tokens_added: bool = False) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (a `PeftModel`); only adapters (and saved modules) train.

    Embeddings and the output layer are trained in full (`modules_to_save`) when
    `lora.train_embeddings` is true, or when it is unset and the tokenizer added tokens: LoRA on the
    other layers cannot give new tokens such as <|im_end|> a useful embedding, and a model that
    cannot represent its end-of-turn token never learns to stop.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = train_cfg.lora
    if train_cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=train_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    train_embeddings = lora.train_embeddings if lora.train_embeddings is not None else tokens_added
    modules_to_save = embedding_module_names(model) if train_embeddings else None
    target = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        modules_to_save=modules_to_save,
        # Tied input/output embeddings (GPT-2, Gemma) must stay tied in the trained copy too.
        ensure_weight_tying=bool(modules_to_save) and embeddings_tied(model),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ExemplarError(f"train.lora: {e}") from None


def embedding_module_names(model: torch.nn.Module) -> list[str]:
    """The module names (as in `named_modules`) of the input embeddings and the output layer."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = []
    for module in wanted:
        if module is None:
            continue
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name is not None and name not in names:
            names.append(name)
    return names


def embeddings_tied(model: torch.nn.Module) -> bool:
    output = model.get_output_embeddings()
    if output is None:
        return False
    return output.weight is model.get_input_embeddings().weight


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
