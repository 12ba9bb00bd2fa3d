"""Small local model folders for the scorer tests: random sequence-classification reward models,
and a causal LM taught a few answers (tests/generation_helpers.py), saved like a trained run."""

from __future__ import annotations

from pathlib import Path

import torch

from exemplar.model import save_model
from tests.generation_helpers import LLAMA, taught_model

SMALL = {k: v for k, v in LLAMA.items() if k != "model_type"}


def reward_model_dir(kind: str, tokenizer, out: Path, seed: int = 0) -> Path:
    """A random `LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` (one output)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        kind, **SMALL, vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def taught_model_dir(tokenizer, answers: dict[str, str], out: Path, steps: int = 150) -> Path:
    # One thread: module fixtures run before the `one_thread` fixture, and two contended threads
    # train a tiny model many times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = taught_model(tokenizer, answers, steps=steps)
    finally:
        torch.set_num_threads(before)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return save_model(model, tokenizer, out, stop_token_ids=[stop])["model"]


def conversation(prompt: str, response: str, row: int = 1, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages, "meta": {"source": {"path": "in.jsonl", "row": row}}}
