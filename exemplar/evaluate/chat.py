"""`exemplar chat`: an interactive REPL over any `Generator`, streaming the answer as it comes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from exemplar.evaluate.generator import GenerationError, GenerationRequest, Generator

HELP = "Type a message; /reset clears the conversation, /exit quits."


def chat_loop(
    generator: Generator,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Chat until /exit or end of input; return the conversation as it stood at the end.

    The whole history is sent each turn, so the prompt is exactly what the prompt encoder (the
    training one, for the local backend) produces for that conversation. Turn t samples with
    seed `seed + t`.
    """
    history = _fresh(system)
    output.write(HELP + "\n")
    turn = 0
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
        request = GenerationRequest(
            list(history),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + turn,
        )
        pieces = []
        try:
            for piece in generator.stream(request):
                output.write(piece)
                output.flush()
                pieces.append(piece)
        except GenerationError as e:  # a server that stayed down: say so, keep the chat going
            output.write(f"\n(no answer: {e})\n")
            history.pop()
            continue
        output.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
    return history


def _fresh(system: str | None) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}] if system else []
