"""Tiny models, synthetic tokenized rows and configs shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from exemplar.config import Config, load_config
from exemplar.data.schema import IGNORE_INDEX

VOCAB = 128
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def model_config(kind: str = "llama"):
    if kind == "llama":
        return LlamaConfig(**_SMALL)
    if kind == "qwen2":
        return Qwen2Config(**_SMALL)
    if kind == "mistral":  # a sliding window shorter than the examples
        return MistralConfig(**_SMALL, sliding_window=4)
    if kind == "gemma":  # tied head, scaled embeddings
        return GemmaConfig(**_SMALL, head_dim=8)
    if kind == "gemma2":  # final logit softcapping
        return Gemma2Config(**_SMALL, head_dim=8, sliding_window=4, final_logit_softcapping=3.0)
    if kind == "gpt2":  # learned positions, tied head
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(kind), attn_implementation=attn)


def synthetic_examples(n: int, seed: int = 0, min_len: int = 2, max_len: int = 24):
    """(input_ids, labels) pairs: random ids, a random prompt prefix and random extra holes untrained.

    Every example has at least one trained label after position 0 (the data pipeline's guarantee).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=g))
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        holes = torch.rand(length, generator=g) < 0.2
        labels = [
            IGNORE_INDEX if h and i > prompt else x
            for i, (x, h) in enumerate(zip(labels, holes.tolist(), strict=True))
        ]
        out.append((ids, labels))
    return out


def synthetic_dataset(n: int, seed: int = 0, **kw) -> datasets.Dataset:
    examples = synthetic_examples(n, seed, **kw)
    return datasets.Dataset.from_dict(
        {"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}
    )


def make_config(output_dir: Path | str, *overrides: str, **mapping) -> Config:
    mapping.setdefault("max_length", 48)
    return load_config(
        None,
        list(overrides),
        data={"train": [{"path": "unused.jsonl"}]},
        tokenizer="unused",
        output_dir=str(output_dir),
        **mapping,
    )


# A random-weight Llama for `model.from_config` that the project's asset tokenizer fits.
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 3072,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def write_run_config(tmp_path: Path, files: list[Path], **extra) -> Path:
    """A YAML config that trains TINY_LLAMA for 2 steps on `files` with the asset tokenizer
    (ChatML), as a user writes one for `exemplar data ...` and `exemplar train`."""
    import yaml

    from exemplar.quickstart import tokenizer_path

    config = {
        "model": {"from_config": TINY_LLAMA},
        "tokenizer": tokenizer_path(),
        "chat_template": "chatml",
        "data": {"train": [{"path": str(f)} for f in files], "cache_dir": str(tmp_path / "cache")},
        "max_length": 256,
        "train": {"micro_batch_size": 4, "max_steps": 2, "lr": 1e-3},
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
