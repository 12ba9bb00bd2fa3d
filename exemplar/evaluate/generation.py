"""Batched generation through `model.generate`: the engine under the local `Generator` backend
(exemplar/evaluate/local.py) and the quickstart's before/after measurement."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from exemplar.model.special_ids import pad_token_id

EncodePrompt = Callable[[list[dict[str, Any]]], list[int]]


def default_encode_prompt(tokenizer: Any) -> EncodePrompt:
    """Messages -> prompt ids with the tokenizer's chat template and the assistant header appended.

    Not what the generators use: `apply_chat_template` turns special-token strings typed by a user
    into control tokens; `exemplar.data.encode.prompt_encoder` (the training encoder) keeps them text."""

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

    temperature 0 is greedy decoding; above 0 samples with nucleus `top_p`, prompt i seeded
    `seed + i` (`sample_batch`). Prompts are left-padded (the new tokens of every row then start at
    the same column) and batched longest-first so rows of similar length share a batch.
    `token_ids`/`text` exclude the stop token; `stopped` is false when the answer hit
    `max_new_tokens` instead.
    """
    if temperature > 0:
        seeds = [seed + i for i in range(len(prompts_token_ids))]
        return sample_batch(
            model,
            tokenizer,
            prompts_token_ids,
            seeds,
            max_new_tokens,
            temperature,
            top_p,
            stop_token_ids,
            batch_size,
        )
    return _decode(
        model, tokenizer, prompts_token_ids, max_new_tokens, stop_token_ids, batch_size, lambda rows: None
    )


@torch.inference_mode()
def sample_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts_token_ids: Sequence[Sequence[int]],
    seeds: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One sampled answer per (prompt, seed), batched, each row drawn from a generator of its own.

    A row's answer depends on its prompt and seed only, not on the rows it shares a batch with,
    so a resumed or reordered run gets the same answers (one generator for the whole batch would
    tie a row's draws to its batch-mates'). `model.generate` has no per-row seeds; sampling from
    softmax(logits / T) is the same as taking the argmax of logits / T plus independent Gumbel
    noise (the Gumbel-max trick), so the rows are decoded greedily over scores to which
    `SeededGumbelNoise` adds each row's own noise. Same dicts as `generate_batch`."""
    if temperature <= 0:
        raise ValueError("sample_batch needs a temperature above 0 (greedy answers: generate_batch)")
    device = _device_of(model)

    def noise(rows: list[int]) -> LogitsProcessorList:
        return LogitsProcessorList([SeededGumbelNoise([seeds[i] for i in rows], temperature, top_p, device)])

    return _decode(model, tokenizer, prompts_token_ids, max_new_tokens, stop_token_ids, batch_size, noise)


def _decode(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None,
    batch_size: int,
    processor_for: Callable[[list[int]], LogitsProcessorList | None],
) -> list[dict[str, Any]]:
    """Greedy decoding in left-padded batches, longest prompts first; `processor_for(rows)` gives
    the logits processor of the batch of those prompt indices (the sampling noise, or none)."""
    stops = list(stop_token_ids) if stop_token_ids else stop_ids_of(model, tokenizer)
    config = generation_config_for(tokenizer, stops, max_new_tokens, 0.0, 1.0)
    pad = int(config.pad_token_id)
    device = _device_of(model)
    order = sorted(range(len(prompts_token_ids)), key=lambda i: -len(prompts_token_ids[i]))
    results: list[dict[str, Any]] = [{}] * len(order)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            prompts = [prompts_token_ids[i] for i in chunk]
            answers = _generate_chunk(model, prompts, config, pad, device, processor_for(chunk))
            for i, ids in zip(chunk, answers, strict=True):
                results[i] = answer_of(tokenizer, ids, stops)
    finally:
        model.train(was_training)
    return results


class SeededGumbelNoise(LogitsProcessor):
    """Scores / temperature, cut to the nucleus `top_p`, plus Gumbel noise from each row's own
    seeded generator: the argmax of the result is a sample of that row's next-token distribution."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.nucleus = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.nucleus is not None:
            scores = self.nucleus(input_ids, scores)
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.stack(
            [
                torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float32)
                for g in self.generators
            ]
        )
        return scores - torch.log(-torch.log(uniform.clamp_min(tiny)))


def generation_config_for(
    tokenizer: Any, stops: list[int], max_new_tokens: int, temperature: float, top_p: float
) -> GenerationConfig:
    """The generation config of every local generation (batched, streamed): the one place that
    picks the padding id."""
    return make_generation_config(max_new_tokens, temperature, top_p, stops, pad_id_of(tokenizer, stops))


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


def _generate_chunk(
    model: torch.nn.Module,
    prompts: list[Sequence[int]],
    config: GenerationConfig,
    pad: int,
    device: torch.device,
    logits_processor: LogitsProcessorList | None = None,
) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        generation_config=config,
        logits_processor=logits_processor,
    )
    return out[:, width:].tolist()


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
