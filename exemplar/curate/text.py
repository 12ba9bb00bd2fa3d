"""What curation compares and measures: a record's prompt and response text, normalised.

- prompt: the text of the user messages; response: the text of the assistant messages (content,
  reasoning and tool calls as sorted JSON); both: user and assistant text in conversation order.
  System prompts and tool results are left out: a system prompt is often the same across a
  whole dataset, and what the model learns is the answer to the question.
- A text record (`{"text"}`) is all response; a pre-tokenized record is its ids as text.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Literal

On = Literal["prompt", "response", "both"]


def normalise(text: str) -> str:
    """Unicode NFKC, case folded, every run of whitespace one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def assistant_text(message: dict[str, Any]) -> str:
    parts = [message.get("reasoning_content") or "", message.get("content") or ""]
    for call in message.get("tool_calls") or []:
        parts.append(json.dumps(call.get("function", call), sort_keys=True, ensure_ascii=False))
    return "\n".join(p for p in parts if p)


def message_texts(record: dict[str, Any], on: On) -> list[str]:
    if "messages" in record:
        roles = {"prompt": ("user",), "response": ("assistant",), "both": ("user", "assistant")}[on]
        return [
            assistant_text(m) if m["role"] == "assistant" else m.get("content") or ""
            for m in record["messages"]
            if m["role"] in roles
        ]
    if on == "prompt":
        return []
    if "text" in record:
        return [record["text"]]
    return [" ".join(map(str, record.get("input_ids", [])))]


def compared_text(record: dict[str, Any], on: On = "both") -> str:
    return "\n".join(message_texts(record, on))
