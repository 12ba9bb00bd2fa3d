"""`exemplar chat`: an interactive REPL that streams the model's answer token by token."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from exemplar.evaluate.generation import (
    EncodePrompt,
    answer_of,
    default_encode_prompt,
    make_generation_config,
    pad_id_of,
    stop_ids_of,
)

HELP = "Type a message; /reset clears the conversation, /exit quits."


class _WriterStreamer(TextStreamer):
    """TextStreamer that writes to any text stream (the stock one prints to stdout)."""

    def __init__(self, tokenizer: Any, output: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.output = output

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.output.write(text + ("\n" if stream_end else ""))
        self.output.flush()


def chat_loop(
    model: torch.nn.Module,
    tokenizer: Any,
    encode_prompt: EncodePrompt | None = None,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Chat until /exit or end of input; return the conversation as it stood at the end.

    The whole history is re-encoded each turn with `encode_prompt`, so the prompt is exactly what
    the chat template produces for that conversation (the same encoding used in training).
    """
    encode = encode_prompt or default_encode_prompt(tokenizer)
    stops = stop_token_ids or stop_ids_of(model, tokenizer)
    config = make_generation_config(max_new_tokens, temperature, top_p, stops, pad_id_of(tokenizer, stops))
    history = _fresh(system)
    output.write(HELP + "\n")
    model.eval()
    while True:
        try:
            line = input_fn(">>> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = _fresh(system)
            output.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        answer = _reply(model, tokenizer, encode(history), config, stops, output)
        history.append({"role": "assistant", "content": answer})
    return history


@torch.inference_mode()
def _reply(
    model: torch.nn.Module, tokenizer: Any, prompt: list[int], config: Any, stops: list[int], output: TextIO
) -> str:
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    streamer = _WriterStreamer(tokenizer, output)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        streamer=streamer,
    )
    return answer_of(tokenizer, out[0, len(prompt) :].tolist(), stops)["text"]


def _fresh(system: str | None) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}] if system else []
