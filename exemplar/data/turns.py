"""`mask.reasoning: every_turn`: each trained turn of a conversation becomes an example of its own.

Many chat templates drop the reasoning of earlier assistant turns (Qwen3, GLM-4.5, MiniMax-M2,
...): rendered whole, a multi-turn conversation trains the reasoning of its last turn only, as
inference shows it. The usual recipe for multi-turn reasoning data is to train each turn as the
model meets it at inference: the conversation up to and including that turn, rendered with it as
the last message, only that turn trained. This module makes those examples; the pipeline counts
them (how many examples from how many conversations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from exemplar.data.schema import Conversation, Example


def every_turn(example: Example, trained: Sequence[int]) -> list[Example]:
    """One conversation per trained message index in `trained`: the messages up to and including
    it, that message alone trained. Text documents, pre-tokenized rows and a conversation whose
    only trained message is its last are returned as they are."""
    if not isinstance(example, Conversation) or not trained:
        return [example]
    last = len(example.messages) - 1
    if list(trained) == [last]:
        return [example]
    return [_up_to(example, i) for i in trained]


def _up_to(conv: Conversation, turn: int) -> Conversation:
    messages = [replace(m, train=(j == turn)) for j, m in enumerate(conv.messages[: turn + 1])]
    return Conversation(messages=messages, tools=conv.tools, meta=conv.meta)


def splits_turns(mask: Any) -> bool:
    """Whether `mask.reasoning: every_turn` makes an example of each trained turn (with every
    token trained there are no turns to tell apart)."""
    return mask.reasoning == "every_turn" and not mask.train_on_everything
