"""Batched generation through `model.generate`, and the `exemplar generate` file-to-file command."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from exemplar.errors import DataError, RowError
from exemplar.model.special_ids import pad_token_id

EncodePrompt = Callable[[list[dict[str, Any]]], list[int]]


def default_encode_prompt(tokenizer: Any) -> EncodePrompt:
    """Messages -> prompt ids with the tokenizer's chat template and the assistant header appended."""

    def encode(messages: list[dict[str, Any]]) -> list[int]:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return as_id_list(out)

    return encode


def as_id_list(out: Any) -> list[int]:
    """Token ids from whatever `apply_chat_template` returned (transformers 5 defaults to a dict)."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one
        out = out[0]
    return [int(i) for i in out]


def stop_ids_of(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The ids that end an answer: the generation config's eos list (Exemplar writes the
    template's end-of-turn tokens there), else the tokenizer's eos."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos]
    ids = [int(i) for i in ids if i is not None]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Generate one answer per prompt; return dicts with text, token_ids and stopped, in input order.

    temperature 0 is greedy decoding; above 0 samples with nucleus `top_p`, reproducibly for a
    `seed`. Prompts are left-padded (the new tokens of every row then start at the same column)
    and batched longest-first so rows of similar length share a batch. `token_ids`/`text` exclude
    the stop token; `stopped` is false when the answer hit `max_new_tokens` instead.
    """
    stops = list(stop_token_ids) if stop_token_ids else stop_ids_of(model, tokenizer)
    pad = pad_id_of(tokenizer, stops)
    config = make_generation_config(max_new_tokens, temperature, top_p, stops, pad)
    device = _device_of(model)
    order = sorted(range(len(prompts_token_ids)), key=lambda i: -len(prompts_token_ids[i]))
    results: list[dict[str, Any]] = [{}] * len(order)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                answers = _generate_chunk(model, [prompts_token_ids[i] for i in chunk], config, pad, device)
                for i, ids in zip(chunk, answers, strict=True):
                    results[i] = answer_of(tokenizer, ids, stops)
    finally:
        model.train(was_training)
    return results


def generate_file(
    model_dir: str | Path,
    input_jsonl: str | Path,
    output_jsonl: str | Path,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    encode_prompt: EncodePrompt | None = None,
    device: str | torch.device | None = None,
    system: str | None = None,
) -> int:
    """`exemplar generate`: answer each line of a JSONL file; return the number of lines written.

    Input lines are {"prompt": str} or {"messages": [...]}. For messages, trailing assistant
    messages are dropped from the prompt (so a held-out file with reference answers can be used
    as is). Output lines keep every input field and add "response" and "stopped".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_prompt_rows(input_jsonl)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).to(target)
    encode = encode_prompt or default_encode_prompt(tokenizer)
    prompts = [encode(prompt_messages(row, system)) for row in rows]
    outputs = generate_batch(
        model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, batch_size=batch_size
    )
    output_jsonl = Path(output_jsonl)
    output_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with output_jsonl.open("w", encoding="utf-8") as f:
        for row, out in zip(rows, outputs, strict=True):
            f.write(
                json.dumps({**row, "response": out["text"], "stopped": out["stopped"]}, ensure_ascii=False)
            )
            f.write("\n")
    return len(rows)


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a prompts JSONL file, each checked to have a usable "prompt" or "messages" field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(str(path), f"line {number}", None, f"not valid JSON: {e}") from None
            _check_prompt_row(row, str(path), number)
            rows.append(row)
    return rows


def prompt_messages(row: dict[str, Any], system: str | None = None) -> list[dict[str, Any]]:
    """The conversation to answer: {"prompt"} becomes one user turn; trailing assistant turns are cut."""
    if "messages" in row:
        messages = list(row["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
    else:
        messages = [{"role": "user", "content": row["prompt"]}]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def make_generation_config(
    max_new_tokens: int, temperature: float, top_p: float, stops: list[int], pad: int
) -> GenerationConfig:
    # A complete config replaces the model's defaults, so a checkpoint's own sampling settings
    # (top_k=50, a repetition penalty...) cannot change what was asked for here.
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
    )


def answer_of(tokenizer: Any, new_ids: list[int], stops: list[int]) -> dict[str, Any]:
    """Cut at the first stop token; what follows it is padding from other rows still generating."""
    cut = next((i for i, t in enumerate(new_ids) if t in stops), None)
    ids = new_ids if cut is None else new_ids[:cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return {"text": text, "token_ids": ids, "stopped": cut is not None}


def pad_id_of(tokenizer: Any, stops: list[int]) -> int:
    return pad_token_id(tokenizer, stops)


# ---------------------------------------------------------------------------------------------


def _check_prompt_row(row: Any, file: str, number: int) -> None:
    where = f"line {number}"
    if not isinstance(row, dict):
        raise RowError(file, where, None, "expected a JSON object with 'prompt' or 'messages'")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RowError(file, where, "messages", "expected a list of {role, content} objects")
        if not any(m.get("role") != "assistant" for m in messages):
            raise RowError(file, where, "messages", "no prompt left after removing the assistant answer")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise RowError(file, where, "prompt", "expected a string")
    else:
        raise RowError(file, where, None, "expected a 'prompt' or a 'messages' field")


def _generate_chunk(
    model: torch.nn.Module,
    prompts: list[Sequence[int]],
    config: GenerationConfig,
    pad: int,
    device: torch.device,
) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
    )
    return out[:, width:].tolist()


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
