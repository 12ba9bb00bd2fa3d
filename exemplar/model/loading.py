"""Load the model to fine-tune: pretrained weights from a folder / Hub id, or a random init from a config.

The loader also makes the model agree with the tokenizer (embedding rows for tokens the chat
template added, pad/eos ids) and, for LoRA/QLoRA, wraps it with PEFT, so the training loop receives
a model that is ready to train.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from exemplar.config import ModelConfig, TrainConfig
from exemplar.errors import ConfigError, ExemplarError
from exemplar.model.lora import apply_lora, check_method_supported, quantization_config
from exemplar.model.special_ids import pad_token_id

logger = logging.getLogger(__name__)

DEFAULT_ATTENTION = "sdpa"


def load_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer: Any,
    resolve: Callable[[str], str] = lambda p: p,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Return the model ready for `train_cfg.method` (a `PeftModel` for lora/qlora).

    `resolve` maps paths from the config to real paths (relative to the YAML file). `device` is where
    training will run; None means CUDA when available. The model is moved there, except for QLoRA
    where bitsandbytes places the quantized weights itself.
    """
    check_method_supported(train_cfg)
    target = torch.device(device) if device is not None else _default_device()
    dtype = weight_dtype(train_cfg, target)
    model = load_base_model(
        model_cfg,
        train_cfg,
        dtype=dtype,
        resolve=resolve,
        device=target,
        token_ids=special_token_ids(tokenizer),
    )
    return prepare_model(model, train_cfg, tokenizer, target)


def prepare_model(
    model: PreTrainedModel,
    train_cfg: TrainConfig,
    tokenizer: Any,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Make a loaded transformers model ready for `train_cfg.method`: embeddings fitted to the
    tokenizer, pad/eos ids set, moved to `device` (None: CUDA when available), LoRA applied.
    `load_model` ends here; `exemplar.finetune(model=...)` starts here with the user's model."""
    target = torch.device(device) if device is not None else _default_device()
    added = fit_embeddings_to_tokenizer(model, tokenizer)
    set_special_token_ids(model, tokenizer)
    if train_cfg.method == "full":
        return model.to(target)
    if train_cfg.method == "lora":
        model = model.to(target)
    return apply_lora(model, train_cfg, tokens_added=added > 0)


def load_base_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    dtype: torch.dtype = torch.float32,
    resolve: Callable[[str], str] = lambda p: p,
    device: torch.device | None = None,
    token_ids: Mapping[str, int | None] | None = None,
) -> PreTrainedModel:
    """The plain transformers model (no PEFT wrapping, no tokenizer fitting).

    `token_ids` (bos/eos/pad ids) fill in a `from_config` config that does not set them: a random
    init has no trained meaning for the architecture's default ids (GPT-2's 50256, say), and
    defaults outside the tokenizer's vocabulary only cause warnings and wrong stopping.
    """
    attn = model_cfg.attn_implementation or DEFAULT_ATTENTION
    if model_cfg.path is not None:
        return _from_pretrained(model_cfg, train_cfg, resolve(model_cfg.path), dtype, attn, device)
    if train_cfg.method == "qlora":
        raise ConfigError(
            "train.method=qlora needs pretrained weights to quantize (model.path); "
            "use method lora or full with model.from_config"
        )
    config = config_from(model_cfg.from_config, resolve, model_cfg.trust_remote_code, token_ids)
    return _from_config(config, train_cfg.seed, dtype, attn, model_cfg.trust_remote_code)


def weight_dtype(train_cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype the weights are stored in.

    Full fine-tuning keeps fp32 master weights (bf16 compute comes from autocast), because AdamW
    updates smaller than bf16's precision would be lost. LoRA freezes the base weights, so on a GPU
    they are stored in bf16 (half the memory) while the small adapter stays fp32 (PEFT upcasts it).
    CPU runs keep fp32 unless bf16 was asked for explicitly.
    """
    if train_cfg.method == "full" or train_cfg.precision == "fp32":
        return torch.float32
    if train_cfg.precision == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def config_from(
    source: str | Mapping[str, Any] | None,
    resolve: Callable[[str], str] = lambda p: p,
    trust_remote_code: bool = False,
    token_ids: Mapping[str, int | None] | None = None,
) -> PretrainedConfig:
    """A transformers config from a mapping with `model_type`, a config.json file, or its folder.

    Keys of `token_ids` that the source does not set are added to it.
    """
    if isinstance(source, Mapping):
        return _config_from_mapping({**(token_ids or {}), **source}, "model.from_config")
    if not isinstance(source, str):
        raise ConfigError("model.from_config must be a config.json path or a mapping with `model_type`")
    path = Path(resolve(source))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.from_config: file not found: {path}")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.from_config: {path} is not valid JSON: {e}") from None
    if "auto_map" in mapping:
        if not trust_remote_code:
            raise ConfigError(_REMOTE_CODE_REFUSED.format(source=path))
        return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=True)
    return _config_from_mapping({**(token_ids or {}), **mapping}, str(path))


def fit_embeddings_to_tokenizer(model: PreTrainedModel, tokenizer: Any) -> int:
    """Grow the embedding matrix when the tokenizer has more tokens; return how many rows were added.

    New rows start at the mean of the existing embeddings rather than at random: a random row in
    the output matrix can get a logit far above the real tokens' and dominate the first steps, while
    the mean keeps the model's next-token distribution almost unchanged (Hewitt, 2021,
    "Initializing new word embeddings for pretrained language models").
    """
    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new <= old:
        return 0
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in _embedding_layers(model)}.values():
            weight = layer.weight
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
    logger.info("resized the embeddings from %d to %d rows for the tokenizer's added tokens", old, new)
    return new - old


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids of a tokenizer as config keys; pad by the one rule (special_ids.pad_token_id)."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_token_id(tokenizer, default=None),
    }


def set_special_token_ids(model: PreTrainedModel, tokenizer: Any) -> None:
    """Fill in pad/eos ids that the model's config lacks (or that lie outside its vocabulary).

    A missing pad id makes `generate` warn and some models refuse padded batches; pad falls back to
    eos, which is safe because the loss masks padded positions by label, not by token id.
    """
    config = model.config
    ids = special_token_ids(tokenizer)
    vocab = model.get_input_embeddings().weight.shape[0]
    for key in ("eos_token_id", "pad_token_id"):
        if ids[key] is not None and not _valid_id(getattr(config, key, None), vocab):
            setattr(config, key, ids[key])
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        for key in ("eos_token_id", "pad_token_id"):
            if not _valid_id(getattr(generation, key, None), vocab):
                setattr(generation, key, getattr(config, key, None))


def _valid_id(value: Any, vocab: int) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, int) and 0 <= v < vocab for v in values)


# ---------------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _from_pretrained(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    source: str,
    dtype: torch.dtype,
    attn: str,
    device: torch.device | None,
) -> PreTrainedModel:
    _refuse_remote_code(source, model_cfg.trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": model_cfg.trust_remote_code,
        "use_safetensors": _use_safetensors(source, model_cfg.allow_pickle_weights),
    }
    if train_cfg.method == "qlora":
        kwargs["quantization_config"] = quantization_config()
        index = (
            device.index if device is not None and device.index is not None else torch.cuda.current_device()
        )
        kwargs["device_map"] = {"": index}
    try:
        return _with_attention_fallback(
            lambda a: AutoModelForCausalLM.from_pretrained(source, attn_implementation=a, **kwargs),
            attn,
            explicit=model_cfg.attn_implementation is not None,
        )
    except OSError as e:
        # Hub ids: we asked for safetensors only; a repo with only pickles ends up here.
        only_pickles = not Path(source).exists() and "safetensors" in str(e)
        if kwargs["use_safetensors"] and only_pickles and model_cfg.allow_pickle_weights:
            warnings.warn(
                f"{source} has no safetensors weights; loading its .bin (pickle) files", stacklevel=2
            )
            kwargs["use_safetensors"] = False
            return AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn, **kwargs)
        if only_pickles:
            raise ConfigError(_PICKLE_REFUSED.format(source=source)) from None
        raise ExemplarError(f"cannot load model.path '{source}': {e}") from None


_PICKLE_REFUSED = (
    "model.path '{source}' has only .bin (pickle) weights, which can run code when loaded: convert them "
    "to safetensors, or set model.allow_pickle_weights: true for files you trust"
)


_REMOTE_CODE_REFUSED = (
    "{source} ships its own Python code (`auto_map` in config.json), which would run on loading: set "
    "model.trust_remote_code: true only for sources you trust"
)


def _refuse_remote_code(source: str, trusted: bool) -> None:
    config = Path(source) / "config.json"
    if trusted or not config.is_file():
        return  # a Hub id: transformers itself refuses its code without trust_remote_code
    try:
        mapping = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config
    if isinstance(mapping, dict) and "auto_map" in mapping:
        raise ConfigError(_REMOTE_CODE_REFUSED.format(source=source))


def _use_safetensors(source: str, allow_pickle: bool) -> bool:
    """Safetensors only. A local folder with nothing but .bin pickles is refused unless the config
    allows pickles (then loaded with a warning); pickles are never picked when safetensors exist.
    """
    folder = Path(source)
    if not folder.is_dir():
        return True  # a Hub id: see the fallback in _from_pretrained
    if any(folder.glob("*.safetensors")):
        return True
    if any(folder.glob("*.bin")):
        if not allow_pickle:
            raise ConfigError(_PICKLE_REFUSED.format(source=folder))
        warnings.warn(
            f"{folder} has only .bin (pickle) weights; loading them as model.allow_pickle_weights says. "
            "Pickles can run code: load only files you trust, or convert them to safetensors",
            stacklevel=3,
        )
        return False
    raise ConfigError(f"model.path '{folder}' has no weights (*.safetensors or *.bin)")


def _from_config(
    config: PretrainedConfig, seed: int, dtype: torch.dtype, attn: str, trust_remote_code: bool
) -> PreTrainedModel:
    # Seed inside a forked RNG: the same seed gives the same weights, and the caller's RNG stream is
    # left as it was (the training loop seeds its own shuffling and dropout).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _with_attention_fallback(
            lambda a: AutoModelForCausalLM.from_config(
                config, attn_implementation=a, dtype=dtype, trust_remote_code=trust_remote_code
            ),
            attn,
            explicit=False,
        )


def _with_attention_fallback(
    build: Callable[[str], PreTrainedModel], attn: str, explicit: bool
) -> PreTrainedModel:
    """Use `attn`; when it is our default (sdpa) and the architecture lacks it, fall back to eager."""
    try:
        return build(attn)
    except ValueError as e:
        if explicit or attn != DEFAULT_ATTENTION or "attn" not in str(e).lower():
            raise
        logger.warning("this architecture does not support sdpa attention; using eager")
        return build("eager")


def _config_from_mapping(mapping: dict[str, Any], where: str) -> PretrainedConfig:
    model_type = mapping.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{where}: needs a `model_type` (for example llama, qwen2, mistral, gemma, gpt2)")
    for key in ("architectures", "transformers_version", "auto_map"):
        mapping.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **mapping)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _embedding_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is not None:
        layers.append(output)
    return layers
