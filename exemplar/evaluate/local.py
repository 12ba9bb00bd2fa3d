"""The local backend: a Hugging Face model folder answered with `model.generate` in this process.

Prompts are encoded by the training prompt encoder (`exemplar.data.encode.prompt_encoder`), so a
prompt is exactly the token ids training saw for the same conversation, and special-token
strings typed by a user stay text (the tokenizer's `apply_chat_template` would turn them into
control tokens).

Seeds: greedy requests are batched (left-padded, see `generate_batch`). Sampled answers are
batched too, each drawn from a generator seeded by its own seed (`sample_batch`): with one shared
generator per batch, a row's sample would depend on which rows it happened to be batched with,
so the same request in a resumed or reordered run would get a different answer. A streamed
answer (`stream`) is drawn the same way, so it is the answer `generate` gives for that seed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList, TextIteratorStreamer

from exemplar.errors import ExemplarError
from exemplar.evaluate.generation import (
    EncodePrompt,
    SeededGumbelNoise,
    generate_batch,
    generation_config_for,
    sample_batch,
    stop_ids_of,
)
from exemplar.evaluate.generator import GenerationRequest, GenerationResult, Generator, Sample


class LocalGenerator(Generator):
    """`Generator` over a loaded model and its tokenizer; stops at the end-of-turn token(s)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        encode_prompt: EncodePrompt | None = None,
        stop_token_ids: Sequence[int] | None = None,
        batch_size: int = 8,
    ):
        super().__init__()
        if encode_prompt is None:
            from exemplar.data.encode import prompt_encoder

            encode_prompt = prompt_encoder(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.encode_prompt = encode_prompt
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids else stop_ids_of(model, tokenizer)
        self.batch_size = batch_size
        self.preferred_batch = batch_size

    @classmethod
    def from_folder(
        cls, model_dir: str | Path, device: str | torch.device | None = None, batch_size: int = 8
    ) -> LocalGenerator:
        """Load a model folder (an `exemplar train` output's model/, or any Hugging Face folder)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = (
            torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ExemplarError(f"cannot load a model from '{model_dir}': {e}") from None
        model.to(target).eval()
        return cls(model, tokenizer, batch_size=batch_size)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        prompts: list[list[int] | None] = []
        results: list[GenerationResult | None] = []
        for request in requests:
            try:
                prompts.append(self._encode(request))
                results.append(None)
            # A conversation the template cannot render is that row's error, not the run's.
            except Exception as e:
                prompts.append(None)
                results.append(GenerationResult(error=f"cannot encode the prompt ({type(e).__name__}: {e})"))
        self._generate_greedy(requests, prompts, results)
        self._generate_sampled(requests, prompts, results)
        return [r for r in results if r is not None]

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        prompt = self._encode(request)
        # Greedy over the scores; a sampled request's noise comes from its seed (SeededGumbelNoise).
        config = generation_config_for(self.tokenizer, self.stop_token_ids, request.max_new_tokens, 0.0, 1.0)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stats.add(requests=1)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=streamer,
        )
        if not request.greedy:
            kwargs["logits_processor"] = LogitsProcessorList(
                [SeededGumbelNoise([request.seed], request.temperature, request.top_p, device)]
            )
        failure: list[BaseException] = []
        worker = threading.Thread(target=self._generate_into, args=(kwargs, failure), daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def _generate_into(self, kwargs: dict[str, Any], failure: list[BaseException]) -> None:
        try:
            with torch.inference_mode():
                self.model.generate(**kwargs)
        except BaseException as e:  # ends the stream, so the reader is not left waiting; re-raised there
            failure.append(e)
            kwargs["streamer"].end()

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.tools:
            return self.encode_prompt(request.messages, request.tools)  # type: ignore[call-arg]
        return self.encode_prompt(request.messages)

    def _generate_greedy(
        self,
        requests: Sequence[GenerationRequest],
        prompts: list[list[int] | None],
        results: list[GenerationResult | None],
    ) -> None:
        """Greedy answers do not depend on the seed: one batched pass per max_new_tokens, and the
        same answer for every one of a request's n samples."""
        wanted = [i for i, r in enumerate(requests) if r.greedy and results[i] is None]
        for limit, group in _groups(wanted, lambda i: requests[i].max_new_tokens):
            answers = generate_batch(
                self.model,
                self.tokenizer,
                [prompts[i] or [] for i in group],
                max_new_tokens=limit,
                stop_token_ids=self.stop_token_ids,
                batch_size=self.batch_size,
            )
            self.stats.add(requests=len(group))
            for i, answer in zip(group, answers, strict=True):
                results[i] = GenerationResult((_sample_of(answer),) * requests[i].n)

    def _generate_sampled(
        self,
        requests: Sequence[GenerationRequest],
        prompts: list[list[int] | None],
        results: list[GenerationResult | None],
    ) -> None:
        """Every sample of every sampled request, batched across requests that share settings."""
        wanted = [i for i, r in enumerate(requests) if results[i] is None]

        def settings(i: int) -> tuple[int, float, float]:
            return requests[i].max_new_tokens, requests[i].temperature, requests[i].top_p

        for (limit, temperature, top_p), group in _groups(wanted, settings):
            rows = [(i, seed) for i in group for seed in requests[i].sample_seeds()]
            answers = sample_batch(
                self.model,
                self.tokenizer,
                [prompts[i] or [] for i, _ in rows],
                [seed for _, seed in rows],
                max_new_tokens=limit,
                temperature=temperature,
                top_p=top_p,
                stop_token_ids=self.stop_token_ids,
                batch_size=self.batch_size,
            )
            self.stats.add(requests=len(rows))
            samples: dict[int, list[Sample]] = {i: [] for i in group}
            for (i, _), answer in zip(rows, answers, strict=True):
                samples[i].append(_sample_of(answer))
            for i in group:
                results[i] = GenerationResult(tuple(samples[i]))


def _groups(indices: list[int], key: Callable[[int], Any]) -> list[tuple[Any, list[int]]]:
    """`indices` grouped by `key`, in key order; each group in input order."""
    groups: dict[Any, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return sorted(groups.items())


def _sample_of(answer: dict[str, Any]) -> Sample:
    stopped = bool(answer["stopped"])
    return Sample(answer["text"], stopped, "stop" if stopped else "length", len(answer["token_ids"]))
