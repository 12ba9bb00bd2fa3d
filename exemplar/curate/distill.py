"""`exemplar curate distill`: every prompt answered by a teacher model (distillation data).

Each input conversation's assistant turns are replaced by the teacher's answers, through the
generation backend (a local model folder, or any OpenAI-compatible server):

- turns "all": every assistant turn is regenerated in order, each one's prompt holding the
  teacher's own earlier answers (not the original ones), so the conversation stays coherent;
- turns "last": only the last assistant turn; earlier ones stay as they are, as context.

A conversation that does not end with an assistant turn (a prompt only) gets the teacher's
answer appended. Assistant turns that call tools are kept as they are: the backend returns text
only. `--system` is sent to the teacher only (the record keeps its own messages), so the
student learns to answer without it.

Each kept record has `meta.distill` = {"teacher", "base_url", "sampling", "seeds" (one per
regenerated turn, in order), "system"}. Seeds: the n-th request of the run (counting turns
in input order) has seed `sampling.seed + n`. A teacher answer cut at the length limit makes
the record removed ("truncated"), unless `keep_truncated`; an empty answer too ("empty_response":
an empty assistant turn cannot be trained on).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm

from exemplar.curate.generation_stage import (
    GenerationWriter,
    Sampling,
    conversation_messages,
    prompt_chunks,
    request_messages,
    source_text,
    with_system,
)
from exemplar.curate.io import Record
from exemplar.errors import DataError
from exemplar.evaluate.generator import GenerationRequest, Generator

Turns = Literal["all", "last"]


@dataclass
class _Conversation:
    """One record being answered: its messages so far and the positions still to answer."""

    record: Record
    messages: list[dict[str, Any]]
    positions: list[int]
    seeds: list[int]
    done: int = 0
    error: str | None = None
    truncated_at: int | None = None
    finish: list[str] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return self.error is None and self.done < len(self.positions)


def turn_positions(messages: list[dict[str, Any]], turns: Turns) -> list[int]:
    """Indices of the assistant turns to (re)generate; len(messages) means "append an answer"."""
    positions = [
        i for i, m in enumerate(messages) if m.get("role") == "assistant" and not m.get("tool_calls")
    ]
    if not messages or messages[-1].get("role") != "assistant":
        positions.append(len(messages))
    return positions[-1:] if turns == "last" else positions


def distill(
    records: Iterable[Record],
    writer: GenerationWriter,
    generator: Generator,
    teacher: str,
    *,
    sampling: Sampling | None = None,
    turns: Turns = "all",
    system: str | None = None,
    base_url: str | None = None,
    keep_truncated: bool = False,
    progress: bool = True,
) -> None:
    """Answer every record with `generator` and write them to `writer` (kept, removed, failed)."""
    sampling = sampling or Sampling()
    next_seed = sampling.seed
    info = {"teacher": teacher, "base_url": base_url, "sampling": sampling.to_dict(), "system": system}
    with tqdm(desc="distill", unit=" prompts", disable=not progress) as bar:
        for chunk in prompt_chunks(records, generator.preferred_batch):
            conversations = []
            for _, record in chunk:
                conversation = _start(record, turns, next_seed)
                next_seed += len(conversation.positions)
                conversations.append(conversation)
            _answer(conversations, generator, sampling, system, keep_truncated)
            for conversation in conversations:
                _write(conversation, writer, info, keep_truncated, sampling)
            bar.update(len(chunk))
    writer.extra["generation_turns"] = turns
    writer.note_generator(generator)


def _start(record: Record, turns: Turns, first_seed: int) -> _Conversation:
    messages = conversation_messages(record)
    positions = turn_positions(messages, turns)
    if not any(m.get("role") in ("user", "tool") for m in messages[: positions[0]]):
        raise DataError(f"{source_text(record)}: an assistant turn with no user message before it to answer")
    seeds = [first_seed + i for i in range(len(positions))]
    return _Conversation(record, messages, positions, seeds)


def _answer(
    conversations: list[_Conversation],
    generator: Generator,
    sampling: Sampling,
    system: str | None,
    keep_truncated: bool,
) -> None:
    """One batch of requests per turn: turn t of every conversation that has one, in order. A
    conversation whose answer was cut stops there (it will be removed) unless `keep_truncated`."""
    while pending := [c for c in conversations if c.pending and (keep_truncated or c.truncated_at is None)]:
        requests = [
            GenerationRequest(
                request_messages(with_system(c.messages[: c.positions[c.done]], system)),
                tools=c.record.get("tools"),
                seed=c.seeds[c.done],
                **sampling.request_args(),
            )
            for c in pending
        ]
        for conversation, result in zip(pending, generator.generate(requests), strict=True):
            if not result.ok:
                conversation.error = result.error
                continue
            _place(conversation, result.text)
            sample = result.samples[0]
            conversation.finish.append(sample.finish_reason)
            if not sample.stopped and conversation.truncated_at is None:
                conversation.truncated_at = conversation.done
            conversation.done += 1


def _place(conversation: _Conversation, text: str) -> None:
    position = conversation.positions[conversation.done]
    answer: dict[str, Any] = {"role": "assistant", "content": text}
    if position == len(conversation.messages):
        conversation.messages.append(answer)
        return
    original = conversation.messages[position]
    if "train" in original:
        answer["train"] = original["train"]
    conversation.messages[position] = answer


def _write(
    conversation: _Conversation,
    writer: GenerationWriter,
    info: dict[str, Any],
    keep_truncated: bool,
    sampling: Sampling,
) -> None:
    record = conversation.record
    if conversation.error is not None:
        writer.fail(record, conversation.error)
        return
    meta = {
        **(record.get("meta") or {}),
        "distill": {
            **info,
            "seeds": conversation.seeds[: conversation.done],
            "finish_reasons": conversation.finish,
        },
    }
    out = {**record, "messages": conversation.messages, "meta": meta}
    if conversation.truncated_at is not None and not keep_truncated:
        writer.remove(
            out,
            "truncated",
            f"the teacher's answer to turn {conversation.truncated_at + 1} reached the "
            f"{sampling.max_new_tokens}-token limit",
        )
    elif empty := [n + 1 for n, p in enumerate(conversation.positions) if not _answer_text(out, p)]:
        # An empty assistant turn cannot be trained on (`exemplar data validate` refuses it).
        writer.remove(out, "empty_response", f"the teacher's answer to turn {empty[0]} is empty")
    else:
        writer.keep(out)


def _answer_text(record: Record, position: int) -> str:
    return (record["messages"][position].get("content") or "").strip()
