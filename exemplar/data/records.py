"""Conversation records: the one JSONL row shape Exemplar writes and reads for a conversation.

A record is the OpenAI `messages` shape plus a free-form `meta` object:

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "...",
                   "tool_calls"?: [{"type": "function", "function": {"name", "arguments": {...}}, "id"?}],
                   "reasoning_content"?: "...",          # assistant only
                   "name"?: "...", "tool_call_id"?: "...",  # tool only
                   "train"?: true | false}],             # absent: decided by the mask options
     "tools"?: [{"type": "function", "function": {"name", "description"?, "parameters"?}}],
     "meta": {"source": {"path": "data/chat.jsonl", "row": 12}, ...}}

`meta.source.row` is the number that `exemplar data validate` prints for the row: the line of a
JSON Lines, CSV or text file, the 1-based position in a JSON list, Parquet/Arrow file or datasets
folder, and the 1-based position of an in-memory row (path "<train_data>" / "<eval_data>").
Everything else in `meta` is free-form (curation stages add `scores`, `removed_by`, `reason`);
it is kept when a record is read again, never tokenized. Text documents and pre-tokenized rows
have records of their own shape, `{"text", "meta"}` and `{"input_ids", "labels"?, "meta"}`.

Records are read by the `messages` (or `text`, `tokenized`) format like any other file, so a
record file trains as is, and converting a record file again gives the same records:
`to_record` of a parsed record is the record (its `meta.source` is kept, not replaced).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from exemplar.data.schema import Conversation, Example, Message, SourceRow, TextDocument, TokenizedExample
from exemplar.fsio import atomic_text_writer

_NUMBER = re.compile(r"(\d+)")


def to_record(example: Example, source: SourceRow | None = None) -> dict[str, Any]:
    """The record of one example; `source` sets `meta.source` unless the example already has one."""
    meta = dict(example.meta or {})
    if source is not None and "source" not in meta:
        meta["source"] = source_of(source)
    if isinstance(example, Conversation):
        record: dict[str, Any] = {"messages": [message_record(m) for m in example.messages]}
        if example.tools:
            record["tools"] = example.tools
    elif isinstance(example, TextDocument):
        record = {"text": example.text}
    elif isinstance(example, TokenizedExample):
        record = {"input_ids": list(example.input_ids)}
        if example.labels is not None:
            record["labels"] = list(example.labels)
    else:
        raise TypeError(f"not an example: {type(example).__name__}")
    if meta:
        record["meta"] = meta
    return record


def message_record(message: Message) -> dict[str, Any]:
    out = message.to_template_dict()
    out.pop("thinking", None)  # the template alias of reasoning_content; a record keeps one name
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    if message.train is not None:
        out["train"] = message.train
    return out


def source_of(source: SourceRow) -> dict[str, Any]:
    """`{"path", "row"}` for a read row; row is the number in its location ("line 12" -> 12)."""
    found = _NUMBER.search(source.location)
    return {"path": source.file, "row": int(found.group(1)) if found else source.index + 1}


# Line separators that json.dumps leaves unescaped but str.splitlines() splits on.
_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line: UTF-8 text rather than ASCII escapes, so that a record file stays readable,
    except the Unicode line separators, so that every reader sees one record per line."""
    return json.dumps(record, ensure_ascii=False).translate(_SEPARATORS) + "\n"


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Stream records to a JSONL file, atomically; returns how many were written."""
    count = 0
    with atomic_text_writer(path) as f:
        for record in records:
            f.write(dumps(record))
            count += 1
    return count
