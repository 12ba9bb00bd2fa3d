"""What a scorer looks at: the last assistant answer of a record and the conversation before it.

Every model-based scorer scores the last assistant message (its text content) given the
messages before it (system, user, earlier turns, tool results). A record without an answer to
score is that record's error, never a silent default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from exemplar.config import Config
from exemplar.curate.scorers.base import Record, Score

T = TypeVar("T")


class NothingToScore(ValueError):
    """The record has no answer (or no prompt) for this scorer: its error message."""


@dataclass(frozen=True)
class Turn:
    context: list[dict[str, Any]]  # the messages before the answer, as chat templates take them
    response: str  # the answer's text
    tools: list[dict[str, Any]] | None = None
    answer: dict[str, Any] | None = None  # the answer's message (with any tool calls)

    @property
    def prompt_text(self) -> str:
        """The user's side as one text: the one user message, or a transcript of several turns."""
        shown = [m for m in self.context if m["role"] != "system"]
        if len(shown) == 1 and shown[0]["role"] == "user":
            return shown[0].get("content") or ""
        return "\n\n".join(f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in shown)


def last_turn(record: Record, need_prompt: bool = True) -> Turn:
    """The last answer and its context; a text record is an answer without a prompt."""
    if "messages" not in record:
        if "text" in record and not need_prompt:
            return _checked(Turn([], record["text"]))
        raise NothingToScore("not a conversation (this scorer needs messages with an assistant answer)")
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise NothingToScore("no assistant message to score")
    context = [_template_message(m) for m in messages[:last]]
    if need_prompt and not any(m["role"] == "user" and (m.get("content") or "").strip() for m in context):
        raise NothingToScore("no user prompt before the answer")
    answer = _template_message(messages[last])
    return _checked(Turn(context, answer.get("content") or "", record.get("tools"), answer))


def _checked(turn: Turn) -> Turn:
    if not turn.response.strip():
        raise NothingToScore("the answer has no text to score")
    return turn


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    # what a chat template is given: no training flags or reasoning (templates do not read them)
    return {k: v for k, v in message.items() if k not in ("train", "reasoning_content")}


def score_each(
    records: list[Record],
    prepare: Callable[[Record], T],
    score_batch: Callable[[list[T]], list[Score]],
) -> list[Score]:
    """Scores in record order: `prepare` each record (NothingToScore is its error), then score
    the prepared ones in one batch."""
    scores: list[Score | None] = [None] * len(records)
    items, where = [], []
    for i, record in enumerate(records):
        try:
            items.append(prepare(record))
            where.append(i)
        except NothingToScore as e:
            scores[i] = Score(None, str(e))
    for i, score in zip(where, score_batch(items) if items else [], strict=True):
        scores[i] = score
    return scores


def use_config_template(tokenizer: Any, config: Config | None) -> None:
    if config is not None and config.chat_template:
        from exemplar.data.tokenizer import load_tokenizer

        load_tokenizer(config, tokenizer)  # sets the config's template on this tokenizer
