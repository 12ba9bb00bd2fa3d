"""Preference rows (DPO data) as SFT examples: the prompt and the `chosen` reply; `rejected` ignored.

Read as ShareGPT or messages, such a row would train on the prompt's turns and never on the
chosen reply, so `detect_format` gives rows with `chosen` and `rejected` their own format. The
shapes of the common DPO datasets, each field renamable with `columns:`:

- TRL's explicit prompt: `{"prompt", "chosen", "rejected"}`, the prompt and the replies all
  strings or all message lists (chosen then holds the reply's messages: assistant, tool).
- TRL's implicit prompt (UltraFeedback binarized and others): `chosen` and `rejected` are whole
  conversations; the prompt is the messages they share from the start, and the reply is the rest
  of `chosen`. A `prompt` string beside them only repeats the first user message: as in TRL, it is
  not used.
- HH-RLHF: `chosen` and `rejected` are dialogues as text, "\\n\\nHuman: ...\\n\\nAssistant: ...",
  read as turns, then as an implicit prompt (a `prompt` string in that style is read the same way).
- Orca DPO pairs (`system`, `question`), LLaMA-Factory's Alpaca ranking (`instruction`, `input`),
  its ShareGPT ranking (`conversations`, with `chosen` / `rejected` one turn each, such as
  `{"from": "gpt", "value": ...}`) and its v1 `chosen_messages` / `rejected_messages`.

The prompt's messages are not trained (like a prompt + completion row: an explicit per-message
`train` still wins); the reply's messages follow the mask options (its assistant turns trained).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from exemplar.data.formats import (
    _Ctx,
    _message_list,
    _openai_message,
    _require_str,
    _sharegpt_turn,
    _system_prefix,
    _tools,
    _turns_look_sharegpt,
    preference_key,
)
from exemplar.data.readers import json_type
from exemplar.data.schema import Conversation, Message

# The fields that may hold the prompt, in the order they are looked for.
PROMPT_FIELDS = ("prompt", "question", "instruction", "conversations", "messages")
_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")
_HH_START = re.compile(r"\s*Human:")


def convert_preference(ctx: _Ctx) -> Conversation:
    chosen_key = _side_key(ctx, "chosen")
    chosen = ctx.row[chosen_key]
    prompt_key = next((ctx.names(f) for f in PROMPT_FIELDS if ctx.names.present(ctx.row, f)), None)
    prompt = ctx.row.get(prompt_key) if prompt_key else None
    if prompt is not None and _is_text(prompt) == _is_text(chosen):
        head = _prompt_messages(ctx, prompt_key, prompt)
        tail = _reply_messages(ctx, chosen_key, chosen, stripped=_is_hh(prompt))
        _side_key(ctx, "rejected")  # ignored, but a preference row has one
    elif prompt is not None and _is_text(chosen):
        raise ctx.error(
            chosen_key,
            f"{chosen_key} is a string but {prompt_key} is a list of messages: give both as strings "
            "or both as messages",
        )
    else:  # no prompt, or a prompt string beside whole conversations (TRL does not use it either)
        head, tail = _split_shared_prompt(ctx, chosen_key, chosen)
    if (head + tail)[0].role != "system":
        head = _system_prefix(ctx) + head
    for msg in head:
        msg.train = False if msg.train is None else msg.train
    return Conversation(messages=head + tail, tools=_tools(ctx))


def _side_key(ctx: _Ctx, side: str) -> str:
    key = preference_key(ctx.row, ctx.names, side)
    if key is None:
        raise ctx.missing(side)
    return key


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and bool(_HH_START.match(value)) and "\n\nAssistant:" in value


# ---------------------------------------------------------------------------------------------
# Explicit prompt


def _prompt_messages(ctx: _Ctx, key: str, value: Any) -> list[Message]:
    if key == ctx.names("instruction"):
        instruction = _require_str(ctx, key, value)
        extra = ctx.row.get(ctx.names("input"))
        extra = _require_str(ctx, ctx.names("input"), extra) if extra is not None else ""
        value = f"{instruction}\n\n{extra}" if instruction and extra.strip() else (instruction or extra)
    if isinstance(value, str):
        if _is_hh(value):
            turns = _hh_messages(value)
            if turns and turns[-1].role == "assistant" and not turns[-1].content:
                turns.pop()  # "...\n\nAssistant:" ends the prompt where the reply starts
            return turns
        if not value.strip():
            raise ctx.error(key, "the prompt is empty")
        return [Message(role="user", content=value)]
    return _messages(ctx, key, _message_list(ctx, key, value, "prompt"))


def _reply_messages(ctx: _Ctx, key: str, value: Any, stripped: bool) -> list[Message]:
    """The reply after an explicit prompt: a string, one message object, or a list of them."""
    if isinstance(value, str):
        text = value.strip() if stripped else value
        if not text.strip():
            raise ctx.error(key, f"{key} is empty: there is nothing to train on")
        return [Message(role="assistant", content=text)]
    if isinstance(value, Mapping):
        messages = _messages(ctx, key, [value], single=True)
    else:
        messages = _messages(ctx, key, _message_list(ctx, key, value, "chosen"))
    for i, msg in enumerate(messages):
        if msg.role not in ("assistant", "tool"):
            where = key if isinstance(value, Mapping) else f"{key}[{i}]"
            raise ctx.error(
                where,
                f"{key} holds the reply to the prompt: its messages must be assistant (or tool), "
                f"not '{msg.role}'",
            )
    return messages


# ---------------------------------------------------------------------------------------------
# Implicit prompt: what chosen and rejected share


def _split_shared_prompt(ctx: _Ctx, chosen_key: str, chosen: Any) -> tuple[list[Message], list[Message]]:
    rejected_key = _side_key(ctx, "rejected")
    mine = _conversation(ctx, chosen_key, chosen)
    other = _conversation(ctx, rejected_key, ctx.row[rejected_key])
    shared = 0
    while shared < min(len(mine), len(other)) and mine[shared] == other[shared]:
        shared += 1
    if shared == len(mine):
        raise ctx.error(
            chosen_key,
            f"{chosen_key} has no reply of its own: every message of it is also in {rejected_key} "
            "(the prompt is what the two share; the reply is what follows)",
        )
    return mine[:shared], mine[shared:]


def _conversation(ctx: _Ctx, key: str, value: Any) -> list[Message]:
    if isinstance(value, str):
        if not _is_hh(value):
            raise ctx.error(
                key,
                f"{key} is a string but the row has no prompt: add a `prompt` (or `question`) field, "
                'or write the dialogue as "\\n\\nHuman: ...\\n\\nAssistant: ..." (HH-RLHF), or give '
                "the conversation as a list of messages",
            )
        return _hh_messages(value)
    if not isinstance(value, list):
        raise ctx.error(key, f"expected a dialogue string or a list of messages, got {json_type(value)}")
    return _messages(ctx, key, _message_list(ctx, key, value, "chosen"))


def _hh_messages(text: str) -> list[Message]:
    """HH-RLHF text as turns: "\\n\\nHuman: a\\n\\nAssistant: b" -> user "a", assistant "b"."""
    parts = _HH_SPEAKER.split("\n\n" + text.lstrip())
    return [
        Message(role="user" if speaker == "Human" else "assistant", content=said.strip())
        for speaker, said in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _messages(ctx: _Ctx, key: str, turns: list[Any], single: bool = False) -> list[Message]:
    """OpenAI messages or ShareGPT turns (told apart by their keys), at `key[i]` (or `key`)."""
    names = ctx.names
    sharegpt = _turns_look_sharegpt(turns, names)
    out = []
    for i, turn in enumerate(turns):
        path = key if single else f"{key}[{i}]"
        if sharegpt:
            out.append(_sharegpt_turn(ctx, path, turn, names("role", "from"), names("content", "value")))
        else:
            out.append(_openai_message(ctx, path, turn, names("role"), names("content")))
    return out
