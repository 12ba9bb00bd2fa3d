"""Turn raw rows of every supported input format into canonical examples.

Formats (see `detect_format` for how "auto" decides):

- "messages": OpenAI chat, `{"messages": [{"role", "content", "tool_calls"?, ...}], "tools"?}`
- "sharegpt": `{"conversations": [{"from", "value"}], "system"?, "tools"?}` (LLaMA-Factory style,
  including `function_call` / `observation` turns)
- "alpaca": `{"instruction", "input"?, "output", "system"?, "history"?}`
- "prompt_completion": `{"prompt", "completion"}`, each a string or a list of messages
- "text": `{"text"}` for continued pre-training
- "tokenized": `{"input_ids", "labels"?}`
- "preference": `{"chosen", "rejected", "prompt"?}` (DPO data, see data/preference.py): trained on
  the prompt + `chosen`; `rejected` is ignored

`CONVERTERS` is the format registry: the built-in formats are its first entries, and
`exemplar.register_format` (data/registry.py) adds a user's own. A row's `meta` object (the
provenance that conversation records carry, see data/records.py) is kept on the example.

Every problem raises `RowError(file, location, field, message)` whose field is a precise path
in the user's own names (e.g. "chat[2].content" when `columns: {messages: chat}`), because the
point of the message is to let someone open the file and fix that exact spot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from exemplar.config import DatasetSpec
from exemplar.data.readers import Resolve, iter_rows, json_type
from exemplar.data.schema import Conversation, Example, Message, SourceRow, TextDocument, TokenizedExample
from exemplar.errors import DataError, RowError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "tokenized", "preference")

# What a format means for training, where that is not obvious: printed beside the format's name.
FORMAT_NOTES = {"preference": "preference rows: training on `chosen`, `rejected` ignored"}

# Keys that `columns:` may map (canonical name -> the name used in the file).
ROW_FIELDS = (
    "messages",
    "conversations",
    "system",
    "tools",
    "instruction",
    "input",
    "output",
    "history",
    "prompt",
    "completion",
    "text",
    "input_ids",
    "labels",
    "chosen",
    "rejected",
    "question",
)
MESSAGE_FIELDS = ("role", "content")  # keys inside each message / ShareGPT turn
MAPPABLE = ROW_FIELDS + MESSAGE_FIELDS

# OpenAI roles, plus Gemma's "model" for the assistant.
OPENAI_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "model": "assistant",
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # value holds the call(s) as JSON
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
MEDIA_PART_TYPES = ("image", "image_url", "input_image", "audio", "input_audio", "video", "file")
# Content parts that carry an assistant's reasoning (-> Message.reasoning_content).
REASONING_PART_TYPES = ("reasoning", "thinking")
PART_TYPES = ("text", *REASONING_PART_TYPES, "tool_call")
# Message-level names of the reasoning: OpenAI-compatible servers' `reasoning_content`, and the
# `reasoning` / `thinking` fields other tools write.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")

SHAPES_HELP = (
    "messages (OpenAI chat), conversations (ShareGPT), instruction + output (Alpaca), "
    "prompt + completion, chosen + rejected (preference), text, input_ids (pre-tokenized)"
)


def describe_format(fmt: str) -> str:
    """A format's name, with what it means for training where that is not obvious."""
    note = FORMAT_NOTES.get(fmt)
    return f"{fmt} ({note})" if note else fmt


# ---------------------------------------------------------------------------------------------
# Column names and error context


class _Names:
    """Canonical field name -> the name used in the file, after `columns:` mapping."""

    def __init__(self, columns: Mapping[str, str] | None):
        self.columns = dict(columns or {})
        self._claimed = {v for k, v in self.columns.items() if k != v}

    def __call__(self, canonical: str, default: str | None = None) -> str:
        return self.columns.get(canonical, default or canonical)

    def present(self, row: Mapping[str, Any], canonical: str) -> bool:
        """Whether the row holds a non-null value for a canonical field.

        A file name that `columns:` assigns to another field does not count for its own
        canonical name: with `{conversations: messages}`, "messages" is not OpenAI messages.
        """
        name = self(canonical)
        if canonical not in self.columns and name in self._claimed:
            return False
        return row.get(name) is not None


_NO_COLUMNS = _Names(None)  # shared: _Names is never modified after construction


class _Ctx:
    """Where the row came from and how its fields are named; builds precise errors."""

    def __init__(self, source: SourceRow, names: _Names):
        self.source = source
        self.row = source.data
        self.names = names

    def error(self, field: str | None, message: str) -> RowError:
        return RowError(self.source.file, self.source.location, field, message)

    def missing(self, canonical: str) -> RowError:
        name = self.names(canonical)
        keys = ", ".join(sorted(map(str, self.row))) or "(none)"
        return self.error(
            name,
            f"missing required field '{name}' (keys found: {keys}); if the file names it "
            f"differently, map it with `columns:`, e.g. columns: {{{canonical}: your_name}}",
        )


def check_columns(columns: Mapping[str, str]) -> None:
    """Reject a `columns:` mapping with unknown canonical keys, before reading any row."""
    unknown = sorted(set(columns) - set(MAPPABLE))
    if unknown:
        raise DataError(
            f"unknown key(s) in `columns:`: {', '.join(unknown)}; mappable keys are: {', '.join(MAPPABLE)}"
        )
    for key, value in columns.items():
        if not isinstance(value, str) or not value:
            raise DataError(f"`columns: {{{key}: ...}}` must name a field of the file, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Detection


def detect_format(
    row: Mapping[str, Any], columns: Mapping[str, str] | None = None, *, source: SourceRow | None = None
) -> str:
    """The format a row has, decided by which (mapped) keys it holds.

    Complete shapes win first, in this order: chosen + rejected (preference rows carry their
    prompt in any of the other shapes' fields, so they come first), messages, conversations,
    instruction + output, prompt + completion, input_ids, text. Failing those, a row with only
    part of a shape (instruction without output, chosen without rejected, ...) gets that format,
    so that the conversion names the missing field instead of a vague "unknown shape". A
    `messages` list whose turns use ShareGPT's from/value keys is "sharegpt". `source` only adds
    file and location to errors.
    """
    names = _Names(columns) if columns else _NO_COLUMNS
    has = lambda canonical: names.present(row, canonical)  # noqa: E731
    chosen, rejected = (preference_key(row, names, side) is not None for side in ("chosen", "rejected"))
    if chosen and rejected:
        return "preference"
    if has("messages"):
        return "sharegpt" if _turns_look_sharegpt(row[names("messages")], names) else "messages"
    if has("conversations"):
        return "sharegpt"
    complete = (
        ("alpaca", ("instruction", "output")),
        ("prompt_completion", ("prompt", "completion")),
        ("tokenized", ("input_ids",)),
        ("text", ("text",)),
    )
    for fmt, fields in complete:
        if all(has(f) for f in fields):
            return fmt
    if chosen or rejected:
        return "preference"
    for fmt, fields in complete[:2]:
        if any(has(f) for f in fields):
            return fmt
    keys = ", ".join(sorted(map(str, row))) or "(none)"
    message = (
        f"cannot tell the format of this row: it has keys {keys}; accepted shapes: {SHAPES_HELP}. "
        "Map differently named fields with `columns:` (e.g. columns: {instruction: question, "
        "output: answer}) or set `format:` in the dataset entry."
    )
    if source is None:
        raise RowError("(row)", "unknown location", None, message)
    raise RowError(source.file, source.location, None, message)


def preference_key(row: Mapping[str, Any], names: _Names, side: str) -> str | None:
    """The row's key of `chosen` or `rejected` (side), None when absent. Unless `columns:` maps
    the side, LLaMA-Factory's `chosen_messages` / `rejected_messages` also count."""
    if names.present(row, side):
        return names(side)
    if side not in names.columns and row.get(f"{side}_messages") is not None:
        return f"{side}_messages"
    return None


def _turns_look_sharegpt(turns: Any, names: _Names) -> bool:
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], Mapping):
        return False
    first = turns[0]
    return "role" not in names.columns and names("role") not in first and "from" in first


# ---------------------------------------------------------------------------------------------
# Conversion


def to_example(source: SourceRow, fmt: str, columns: Mapping[str, str] | None = None) -> Example:
    """Convert one raw row to a Conversation, TextDocument or TokenizedExample.

    `fmt` is one of FORMATS (or "auto" to detect it from this row alone). `columns` maps
    canonical names to the file's names. Mappable row-level keys: messages, conversations,
    system, tools, instruction, input, output, history, prompt, completion, text, input_ids,
    labels, chosen, rejected, question. Mappable keys inside each message or ShareGPT turn: role
    and content (defaults role/content for OpenAI messages, from/value for ShareGPT). Other
    message keys (tool_calls, reasoning_content or its aliases reasoning / thinking, train,
    weight or loss_weight, name, tool_call_id) keep their names.

    Raises RowError naming the field path (in the file's names) of the first problem.
    """
    names = _Names(columns) if columns else _NO_COLUMNS
    if fmt == "auto":
        fmt = detect_format(source.data, names.columns, source=source)
    converter = CONVERTERS.get(fmt)
    if converter is None:
        raise DataError(f"unknown format '{fmt}'; expected auto or one of: {', '.join(CONVERTERS)}")
    example = converter(_Ctx(source, names))
    meta = source.data.get("meta")
    if example.meta is None and isinstance(meta, Mapping):
        example.meta = dict(meta)
    return example


def _messages(ctx: _Ctx) -> Conversation:
    key = ctx.names("messages")
    turns = _message_list(ctx, key, ctx.row.get(key), "messages")
    role_key, content_key = ctx.names("role"), ctx.names("content")
    messages = [_openai_message(ctx, f"{key}[{i}]", m, role_key, content_key) for i, m in enumerate(turns)]
    return Conversation(messages=messages, tools=_tools(ctx))


def _message_list(ctx: _Ctx, path: str, value: Any, canonical: str) -> list[Any]:
    if value is None:
        raise ctx.missing(canonical)
    if not isinstance(value, list):
        raise ctx.error(path, f"expected a list of messages, got {json_type(value)}")
    if not value:
        raise ctx.error(path, "the conversation is empty: it needs at least one message")
    return value


def _openai_message(ctx: _Ctx, path: str, message: Any, role_key: str, content_key: str) -> Message:
    if not isinstance(message, Mapping):
        raise ctx.error(path, f"each message must be an object, got {json_type(message)}")
    role = _role(ctx, f"{path}.{role_key}", message.get(role_key), OPENAI_ROLES)
    calls = message.get("tool_calls")
    if calls is not None and role != "assistant":
        raise ctx.error(f"{path}.tool_calls", f"only assistant messages can have tool_calls, not '{role}'")
    msg = _message(ctx, path, message, role, content_key, _tool_calls(ctx, f"{path}.tool_calls", calls))
    if role == "tool":
        msg.name = _optional_str(ctx, f"{path}.name", message.get("name"))
        msg.tool_call_id = _optional_str(ctx, f"{path}.tool_call_id", message.get("tool_call_id"))
    return msg


def _message(
    ctx: _Ctx,
    path: str,
    message: Mapping[str, Any],
    role: str,
    content_key: str,
    calls: list[dict[str, Any]] | None,
) -> Message:
    """A message from its content (a string or a list of parts), reasoning fields and calls."""
    value = message.get(content_key)
    if type(value) is str and not _has_reasoning_field(message):  # the common case, kept fast
        if role == "assistant" and not calls and not value.strip():
            _check_not_empty(ctx, f"{path}.{content_key}", value, value, role, calls, None)
        return Message(role, value, calls, _train_flag(ctx, path, message))
    content_path = f"{path}.{content_key}"
    body = _Body(ctx, content_path, value, role)
    calls = (calls or []) + body.tool_calls or None
    reasoning = _reasoning(ctx, path, message, role, body)
    _check_not_empty(ctx, content_path, value, body.text, role, calls, reasoning)
    return Message(
        role=role,
        content=body.text,
        tool_calls=calls,
        train=_train_flag(ctx, path, message),
        reasoning_content=reasoning,
    )


def _has_reasoning_field(message: Mapping[str, Any]) -> bool:
    return "reasoning_content" in message or "reasoning" in message or "thinking" in message


def _role(ctx: _Ctx, path: str, value: Any, accepted: Mapping[str, str]) -> str:
    if value is None:
        raise ctx.error(path, "missing role")
    if not isinstance(value, str):
        raise ctx.error(path, f"role must be a string, got {json_type(value)}")
    role = accepted.get(value.strip().lower())
    if role is None:
        raise ctx.error(path, f"unknown role '{value}'; accepted: {', '.join(accepted)}")
    return role


class _Body:
    """A message's content: a string, or a list of parts joined in order with "" per kind:
    `text` parts (text under `text` or `value`), `reasoning` / `thinking` parts (the reasoning),
    `tool_call` parts (a call as an object or a JSON string, under `value`, or the part itself)."""

    def __init__(self, ctx: _Ctx, path: str, value: Any, role: str):
        self.text = ""
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.reasoning_path = path
        if value is None:
            return
        if isinstance(value, str):
            self.text = value
        elif isinstance(value, list):
            texts = []
            for j, part in enumerate(value):
                kind = _part_type(ctx, f"{path}[{j}]", part, role)
                if kind == "text":
                    texts.append(_part_text(ctx, f"{path}[{j}]", part, ("text", "value")))
                elif kind in REASONING_PART_TYPES:
                    self.reasoning.append(_part_text(ctx, f"{path}[{j}]", part, ("text", "value", kind)))
                    self.reasoning_path = f"{path}[{j}]"
                else:
                    self.tool_calls.append(_tool_call_part(ctx, f"{path}[{j}]", part))
            self.text = "".join(texts)
        else:
            raise ctx.error(path, f"content must be a string or a list of parts, got {json_type(value)}")


def _part_type(ctx: _Ctx, path: str, part: Any, role: str) -> str:
    if not isinstance(part, Mapping):
        raise ctx.error(
            path,
            f'a content part must be an object like {{"type": "text", "text": ...}}, got {json_type(part)}',
        )
    kind = part.get("type")
    if kind in MEDIA_PART_TYPES:
        raise ctx.error(
            path, f"content part of type '{kind}': images/audio are not supported (text-only SFT)"
        )
    if kind not in PART_TYPES:
        raise ctx.error(
            f"{path}.type", f"unknown content part type {kind!r}; accepted: {', '.join(PART_TYPES)}"
        )
    if kind != "text" and role != "assistant":
        raise ctx.error(f"{path}.type", f"a '{kind}' part belongs in an assistant message, not '{role}'")
    return kind


def _part_text(ctx: _Ctx, path: str, part: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """A part's text, under the first of `keys` it has."""
    for key in keys:
        if part.get(key) is not None:
            return _require_str(ctx, f"{path}.{key}", part[key])
    accepted = " or ".join(f"'{k}'" for k in keys)
    raise ctx.error(f"{path}.{keys[0]}", f"a '{part.get('type')}' part needs its text under {accepted}")


def _tool_call_part(ctx: _Ctx, path: str, part: Mapping[str, Any]) -> dict[str, Any]:
    """A `tool_call` part: the call under `value` (an object, or a JSON string of one, as in
    LLaMA-Factory's data), or the part itself in the OpenAI or flat {"name", "arguments"} form."""
    if part.get("value") is None:
        return _tool_call(ctx, path, {k: v for k, v in part.items() if k != "type"})
    value_path = f"{path}.value"
    return _tool_call(ctx, value_path, _parsed(ctx, value_path, part["value"], "tool_call value"))


def _parsed(ctx: _Ctx, path: str, value: Any, what: str) -> Any:
    """A value that may be given as a JSON string (tool calls, arguments, tools), parsed."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ctx.error(path, f"{what} is not valid JSON: {e.msg} (column {e.colno})") from None


def _reasoning(ctx: _Ctx, path: str, message: Mapping[str, Any], role: str, body: _Body | None) -> str | None:
    """The reasoning: one of the REASONING_FIELDS, or the content's reasoning parts (not both)."""
    if body is None or not body.reasoning:
        if not _has_reasoning_field(message):
            return None
        body = None
    given = [key for key in REASONING_FIELDS if message.get(key) is not None]
    if body is not None:
        given.append("reasoning parts")
    if len(given) > 1:
        raise ctx.error(
            f"{path}.{given[1]}" if given[1] in REASONING_FIELDS else body.reasoning_path,
            f"the reasoning is given twice ({' and '.join(given)}); keep one",
        )
    if not given:
        return None
    if role != "assistant":
        raise ctx.error(f"{path}.{given[0]}", f"only assistant messages have reasoning, not '{role}'")
    if body is not None:
        return "".join(body.reasoning)
    return _require_str(ctx, f"{path}.{given[0]}", message[given[0]])


def _check_not_empty(
    ctx: _Ctx, path: str, value: Any, text: str, role: str, calls: Any, reasoning: str | None
) -> None:
    """Only an assistant message with tool calls or reasoning may have no content."""
    reasoned = bool(reasoning and reasoning.strip())
    if value is None and not (role == "assistant" and (calls or reasoned)):
        raise ctx.error(
            path, "missing content (only an assistant message with tool_calls or reasoning may omit it)"
        )
    if role == "assistant" and not calls and not reasoned and not text.strip():
        raise ctx.error(path, "assistant message is empty (no content, tool_calls or reasoning)")


def _tool_calls(ctx: _Ctx, path: str, value: Any) -> list[dict[str, Any]] | None:
    """Normalize tool calls to [{"type": "function", "function": {"name", "arguments": dict}}].

    Accepts the OpenAI form and the flat {"name", "arguments"} form; string arguments holding a
    JSON object are parsed so that templates can `tojson` them like any other mapping.
    """
    if value is None:
        return None
    if not isinstance(value, list):
        raise ctx.error(path, f"tool_calls must be a list, got {json_type(value)}")
    return [_tool_call(ctx, f"{path}[{j}]", call) for j, call in enumerate(value)] or None


def _tool_call(ctx: _Ctx, path: str, call: Any) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ctx.error(path, f"a tool call must be an object, got {json_type(call)}")
    if call.get("type", "function") not in ("function", None):
        raise ctx.error(
            f"{path}.type", f"unsupported tool call type {call.get('type')!r}; expected 'function'"
        )
    if "function" in call:
        fn, fn_path = call["function"], f"{path}.function"
        if not isinstance(fn, Mapping):
            raise ctx.error(fn_path, f"expected an object with name and arguments, got {json_type(fn)}")
    else:
        fn, fn_path = call, path  # the flat form {"name", "arguments"}
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ctx.error(
            f"{fn_path}.name", f"a tool call needs a non-empty string name, got {json_type(name)}"
        )
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": _arguments(ctx, f"{fn_path}.arguments", fn.get("arguments"))},
    }
    if call.get("id") is not None:
        out["id"] = _require_str(ctx, f"{path}.id", call["id"])
    return out


def _arguments(ctx: _Ctx, path: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str) and not value.strip():
        return {}
    value = _parsed(ctx, path, value, "arguments string")
    if not isinstance(value, Mapping):
        raise ctx.error(path, f"arguments must be a JSON object, got {json_type(value)}")
    return dict(value)


def _train_flag(ctx: _Ctx, path: str, message: Mapping[str, Any]) -> bool | None:
    """Per-message `train` (bool) or `weight` (0 or 1; LLaMA-Factory writes `loss_weight`)
    forcing the message (un)trained."""
    train = message.get("train")
    if train is not None and not isinstance(train, bool):
        raise ctx.error(f"{path}.train", f"train must be true or false, got {json_type(train)}")
    for key in ("weight", "loss_weight"):
        weight = message.get(key)
        if weight is None:
            continue
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise ctx.error(
                f"{path}.{key}",
                f"{key} must be 0 or 1 (fractional loss weights are not supported), got {weight!r}",
            )
        if train is not None and train != bool(weight):
            raise ctx.error(f"{path}.{key}", f"{key} {weight!r} contradicts train {train!r}")
        train = bool(weight)
    return train


def _tools(ctx: _Ctx) -> list[dict[str, Any]] | None:
    """Row-level tool schemas (a list or a JSON string of one) in OpenAI form; [] -> None."""
    key = ctx.names("tools")
    value = ctx.row.get(key)
    if value is None:
        return None
    if isinstance(value, str) and not value.strip():
        return None
    value = _parsed(ctx, key, value, "tools string")
    if isinstance(value, Mapping):
        value = [value]  # a single schema
    if not isinstance(value, list):
        raise ctx.error(key, f"tools must be a list of function schemas, got {json_type(value)}")
    return [_tool_schema(ctx, f"{key}[{j}]", tool) for j, tool in enumerate(value)] or None


def _tool_schema(ctx: _Ctx, path: str, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise ctx.error(path, f"a tool must be a function schema object, got {json_type(tool)}")
    if "function" in tool:
        if tool.get("type", "function") != "function" or not isinstance(tool["function"], Mapping):
            raise ctx.error(path, 'expected {"type": "function", "function": {"name", "parameters"}}')
        fn, fn_path = dict(tool["function"]), f"{path}.function"
    else:
        fn, fn_path = dict(tool), path  # a bare schema {"name", "description", "parameters"}
    if not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise ctx.error(
            f"{fn_path}.name", f"a tool schema needs a non-empty string name, got {json_type(fn.get('name'))}"
        )
    return {"type": "function", "function": fn}


def _sharegpt(ctx: _Ctx) -> Conversation:
    key = ctx.names("conversations")
    if (
        ctx.row.get(key) is None
        and "conversations" not in ctx.names.columns
        and ctx.row.get("messages") is not None
    ):
        key = "messages"  # ShareGPT turns stored under "messages" (detected by their from/value keys)
    turns = _message_list(ctx, key, ctx.row.get(key), "conversations")
    role_key, content_key = ctx.names("role", "from"), ctx.names("content", "value")
    messages = _system_prefix(ctx)
    for i, turn in enumerate(turns):
        messages.append(_sharegpt_turn(ctx, f"{key}[{i}]", turn, role_key, content_key))
    return Conversation(messages=messages, tools=_tools(ctx))


def _sharegpt_turn(ctx: _Ctx, path: str, turn: Any, role_key: str, content_key: str) -> Message:
    if not isinstance(turn, Mapping):
        raise ctx.error(path, f"each turn must be an object, got {json_type(turn)}")
    speaker = turn.get(role_key)
    role = _role(ctx, f"{path}.{role_key}", speaker, SHAREGPT_ROLES)
    value_path, value = f"{path}.{content_key}", turn.get(content_key)
    if speaker.strip().lower() == "function_call":
        calls = _function_call_value(ctx, value_path, value)
        reasoning = _reasoning(ctx, path, turn, role, None)
        return Message("assistant", "", calls, _train_flag(ctx, path, turn), reasoning_content=reasoning)
    return _message(ctx, path, turn, role, content_key, None)


def _function_call_value(ctx: _Ctx, path: str, value: Any) -> list[dict[str, Any]]:
    """A function_call turn's value: JSON of {"name", "arguments"} or a list of them."""
    value = _parsed(ctx, path, value, "function_call value")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ctx.error(
            path,
            f'function_call value must be {{"name", "arguments"}} or a non-empty list of them, got {json_type(value)}',
        )
    return [_tool_call(ctx, f"{path}[{j}]", call) for j, call in enumerate(value)]


def _system_prefix(ctx: _Ctx) -> list[Message]:
    """A row-level `system` string as a leading system message (none when empty)."""
    key = ctx.names("system")
    system = _optional_str(ctx, key, ctx.row.get(key))
    return [Message(role="system", content=system)] if system and system.strip() else []


def _alpaca(ctx: _Ctx) -> Conversation:
    names = ctx.names
    instruction = _field_str(ctx, "instruction")
    extra = _optional_str(ctx, names("input"), ctx.row.get(names("input")))
    output = _field_str(ctx, "output")
    extra = extra if extra and extra.strip() else ""
    prompt = f"{instruction}\n\n{extra}" if extra and instruction else (instruction or extra)
    if not prompt.strip():
        raise ctx.error(names("instruction"), "instruction is empty (and there is no input)")
    if not output.strip():
        raise ctx.error(names("output"), "output is empty: there is nothing to train on")
    messages = _system_prefix(ctx) + _history(ctx)
    messages += [Message(role="user", content=prompt), Message(role="assistant", content=output)]
    return Conversation(messages=messages)


def _history(ctx: _Ctx) -> list[Message]:
    """Alpaca `history`: [[user, assistant], ...] turns that precede the instruction."""
    key = ctx.names("history")
    value = ctx.row.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(key, f"history must be a list of [user, assistant] pairs, got {json_type(value)}")
    messages = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ctx.error(f"{key}[{i}]", f"expected a [user, assistant] pair, got {json_type(pair)}")
        messages.append(Message(role="user", content=_require_str(ctx, f"{key}[{i}][0]", pair[0])))
        messages.append(Message(role="assistant", content=_require_str(ctx, f"{key}[{i}][1]", pair[1])))
    return messages


def _prompt_completion(ctx: _Ctx) -> Conversation:
    """Strings or message lists. Prompt messages default to train=False: a completion dataset
    means "train on the completion only" (an explicit per-message train/weight still wins)."""
    names = ctx.names
    p_key, c_key = names("prompt"), names("completion")
    prompt, completion = ctx.row.get(p_key), ctx.row.get(c_key)
    if prompt is None:
        raise ctx.missing("prompt")
    if completion is None:
        raise ctx.missing("completion")
    role_key, content_key = names("role"), names("content")
    if isinstance(prompt, list):
        head = [_openai_message(ctx, f"{p_key}[{i}]", m, role_key, content_key) for i, m in enumerate(prompt)]
    else:
        head = [
            Message(role="user", content=_require_str(ctx, p_key, prompt, "a string or a list of messages"))
        ]
    for msg in head:
        msg.train = False if msg.train is None else msg.train
    if isinstance(completion, list):
        turns = _message_list(ctx, c_key, completion, "completion")
        tail = [_openai_message(ctx, f"{c_key}[{i}]", m, role_key, content_key) for i, m in enumerate(turns)]
        for i, msg in enumerate(tail):
            if msg.role not in ("assistant", "tool"):
                raise ctx.error(
                    f"{c_key}[{i}].{role_key}",
                    f"completion messages must be assistant (or tool), not '{msg.role}'",
                )
    else:
        text = _require_str(ctx, c_key, completion, "a string or a list of messages")
        if not text.strip():
            raise ctx.error(c_key, "completion is empty: there is nothing to train on")
        tail = [Message(role="assistant", content=text)]
    return Conversation(messages=head + tail, tools=_tools(ctx))


def _text(ctx: _Ctx) -> TextDocument:
    text = _field_str(ctx, "text")
    if not text.strip():
        raise ctx.error(ctx.names("text"), "text is empty")
    return TextDocument(text=text)


def _tokenized(ctx: _Ctx) -> TokenizedExample:
    ids_key, labels_key = ctx.names("input_ids"), ctx.names("labels")
    if ctx.row.get(ids_key) is None:
        raise ctx.missing("input_ids")
    input_ids = _int_list(ctx, ids_key, ctx.row.get(ids_key), lambda v: v >= 0, "a non-negative token id")
    if not input_ids:
        raise ctx.error(ids_key, "input_ids is empty")
    labels = ctx.row.get(labels_key)
    if labels is not None:
        labels = _int_list(ctx, labels_key, labels, lambda v: v >= 0 or v == -100, "a token id >= 0 or -100")
        if len(labels) != len(input_ids):
            raise ctx.error(labels_key, f"has {len(labels)} labels but input_ids has {len(input_ids)} tokens")
    return TokenizedExample(input_ids=input_ids, labels=labels)


def _int_list(ctx: _Ctx, key: str, value: Any, ok: Callable[[int], bool], what: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ctx.error(key, f"expected a list of integers, got {json_type(value)}")
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
            raise ctx.error(f"{key}[{j}]", f"expected {what}, got {json_type(v)}")
    return list(value)


# ---------------------------------------------------------------------------------------------
# Strings


def _field_str(ctx: _Ctx, canonical: str) -> str:
    """A required row-level string field."""
    name = ctx.names(canonical)
    value = ctx.row.get(name)
    if value is None:
        raise ctx.missing(canonical)
    return _require_str(ctx, name, value)


def _require_str(ctx: _Ctx, path: str, value: Any, expected: str = "a string") -> str:
    if value is None:
        raise ctx.error(path, "missing (null)")
    if not isinstance(value, str):
        raise ctx.error(path, f"expected {expected}, got {json_type(value)}")
    return value


def _optional_str(ctx: _Ctx, path: str, value: Any) -> str | None:
    return None if value is None else _require_str(ctx, path, value)


def _preference(ctx: _Ctx) -> Conversation:
    from exemplar.data.preference import convert_preference  # it builds on this module's helpers

    return convert_preference(ctx)


# The format registry: name -> converter of one row. `exemplar.register_format` adds to it.
CONVERTERS: dict[str, Callable[[_Ctx], Example]] = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "text": _text,
    "tokenized": _tokenized,
    "preference": _preference,
}


# ---------------------------------------------------------------------------------------------
# Whole datasets


def convert_all(
    spec: DatasetSpec,
    resolve: Resolve = lambda p: p,
    file_formats: dict[str, tuple[str, str]] | None = None,
) -> tuple[list[tuple[SourceRow, Example]], list[RowError]]:
    """Read and convert every row of a dataset, collecting every problem instead of the first.

    With `format: auto` each file's format is decided by its first row; a later row of another
    shape is a RowError (mixed formats in one file are almost always a mistake, and guessing per
    row would hide it). Raises DataError only when the source as a whole is unusable.
    `file_formats`, when given, receives each file's format (see `convert_rows`).
    """
    examples: list[tuple[SourceRow, Example]] = []
    problems: list[RowError] = []
    for item in iter_examples(spec, resolve, file_formats):
        if isinstance(item, RowError):
            problems.append(item)
        else:
            examples.append(item)
    return examples, problems


def iter_examples(
    spec: DatasetSpec,
    resolve: Resolve = lambda p: p,
    file_formats: dict[str, tuple[str, str]] | None = None,
) -> Iterator[tuple[SourceRow, Example] | RowError]:
    """`convert_all` one row at a time: (source, example), or the RowError in the row's place."""
    check_columns(spec.columns)
    yield from convert_rows(iter_rows(spec, resolve), spec, {} if file_formats is None else file_formats)


def convert_rows(
    items: Iterable[SourceRow | RowError], spec: DatasetSpec, file_formats: dict[str, tuple[str, str]]
) -> Iterator[tuple[SourceRow, Example] | RowError]:
    """Convert read rows in order. `file_formats` (file -> (format, location that decided it))
    is the `format: auto` state so far: empty at the start of a dataset, or `format_decisions`
    up to a row, to convert a slice of a dataset on its own exactly as in one pass. It also
    tells the caller afterwards which format each file was read as (a forced `format:` too)."""
    for item in items:
        if isinstance(item, RowError):
            yield item
            continue
        try:
            if spec.format != "auto":
                fmt = spec.format
                file_formats.setdefault(item.file, (fmt, item.location))
            else:
                fmt = _file_format(item, spec.columns, file_formats)
            example = to_example(item, fmt, spec.columns)
        except RowError as e:
            yield e
            continue
        yield item, example


def format_decisions(
    items: Sequence[SourceRow | RowError], spec: DatasetSpec
) -> dict[str, tuple[int, str, str]]:
    """For `format: auto`: file -> (index of the row that decides its format, format, location),
    as a pass of `convert_rows` over `items` would decide them."""
    decided: dict[str, tuple[int, str, str]] = {}
    if spec.format != "auto":
        return decided
    for i, item in enumerate(items):
        if isinstance(item, RowError) or item.file in decided:
            continue
        try:
            shape = detect_format(item.data, spec.columns, source=item)
        except RowError:
            continue
        decided[item.file] = (i, shape, item.location)
    return decided


def _file_format(source: SourceRow, columns: Mapping[str, str], known: dict[str, tuple[str, str]]) -> str:
    """The format of the row's file, fixed by the file's first recognizable row."""
    decided = known.get(source.file)
    try:
        shape = detect_format(source.data, columns, source=source)
    except RowError:
        if decided is None:
            raise
        return decided[0]  # convert as the file's format: that names the missing field
    if decided is None:
        known[source.file] = (shape, source.location)
        return shape
    fmt, where = decided
    if shape != fmt:
        keys = ", ".join(sorted(map(str, source.data)))
        raise RowError(
            source.file,
            source.location,
            None,
            f"this row has the shape of '{shape}' (keys: {keys}) but the file's first row ({where}) "
            f"is '{fmt}'; one file must hold one format (set `format:` to convert every row as one)",
        )
    return fmt
