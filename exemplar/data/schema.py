"""The canonical examples that every input format is converted into.

Readers produce raw rows; `formats.to_example` turns each raw row into exactly one of these;
the encoder (`data.encode`) turns these into `input_ids` and `labels`. Plain dataclasses keep
this boundary explicit and cheap to pickle for worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


# The message keys chat templates read an assistant's reasoning from (no template reads both).
TEMPLATE_REASONING_KEYS = ("reasoning_content", "thinking")


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    # OpenAI-style tool calls of an assistant message:
    # [{"type": "function", "function": {"name": str, "arguments": dict | str}, "id"?: str}]
    tool_calls: list[dict[str, Any]] | None = None
    # None: decided by the mask options (trained roles, last turn only). False/True: forced.
    train: bool | None = None
    name: str | None = None  # tool name for role == "tool" (optional)
    tool_call_id: str | None = None
    # An assistant message's reasoning ("thinking") text, as OpenAI-compatible servers return it.
    # Passed to chat templates under both names that templates read: `reasoning_content` (Qwen3,
    # GLM, MiniMax, Seed-OSS, Command R) and `thinking` (LFM2.5, gpt-oss).
    reasoning_content: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (the keys transformers passes)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content:
            for name in TEMPLATE_REASONING_KEYS:
                out[name] = self.reasoning_content
        return out


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None  # JSON schemas, passed to the template as `tools`
    # Provenance and curation notes (`source`, later `scores`, `removed_by`, ...); never tokenized.
    meta: dict[str, Any] | None = None


@dataclass
class TextDocument:
    """Plain text for continued pre-training: every token is trained."""

    text: str
    meta: dict[str, Any] | None = None


@dataclass
class TokenizedExample:
    """Pre-tokenized input. `labels` None means every token is trained."""

    input_ids: list[int]
    labels: list[int] | None = None
    meta: dict[str, Any] | None = None


Example = Conversation | TextDocument | TokenizedExample

IGNORE_INDEX = -100


@dataclass
class SourceRow:
    """One raw row of one data file, with where it came from (for error messages)."""

    file: str
    location: str  # "line 12", "row 3"
    index: int  # 0-based position within its file
    data: dict[str, Any] = field(default_factory=dict)
