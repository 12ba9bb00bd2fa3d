"""Where each trained assistant turn's output is in a rendered conversation, for any template.

The rule (README, "Loss masks"): a turn's output starts where the prompt for it (the conversation
before it, rendered with the generation prompt) stops matching the rendering of the whole
conversation, and ends with the template's stop token after the message's last rendered field
(content, reasoning or tool calls); with no stop token there, at the end of that field (counted as a
turn without stop). Text the generation prompt supplies (an opening `<think>\\n`) is not the
model's to generate and stays untrained, as at inference.

Field ends. Every non-empty string the data supplies (contents, reasoning, tool-call names,
argument keys and values) is rendered once more with a distinct rare character appended (before
any trailing whitespace, which a template may trim). Deleting
those characters from that rendering must give the real rendering back; then each character's
position is where its field ends in the real rendering, whatever the template did with the field
(JSON or Python escaping, `| trim`, a `<think>` block split out of the content). A field whose
character never appears was dropped by the template: counted per field.

Typed special tokens. A special-token string inside any of those strings, or in `tools`, is
replaced by a marker character and the conversation rendered again; substituting the tokens back
must give the real rendering. The markers' positions are the places where text that looks like a
control token must stay text; every other special-token string in the rendering is the template's.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from exemplar.data.schema import TEMPLATE_REASONING_KEYS
from exemplar.errors import TemplateError

Span = tuple[int, int]

# Blocks of printable letters that chat data almost never holds (Yi syllables, Canadian syllabics,
# Vai): printable, so Python's repr (`| string`) keeps them, not whitespace (`| trim`), caseless
# (`| upper`), and left alone by JSON without `ensure_ascii`.
_ALPHABETS = ((0xA000, 0xA48C), (0x1401, 0x166C), (0xA500, 0xA60B))


def alphabet_for(text: str, needed: int) -> Iterator[str]:
    """`needed` marker characters, from the first block that `text` does not use."""
    for lo, hi in _ALPHABETS:
        if hi - lo >= needed and not re.search(f"[{chr(lo)}-{chr(hi)}]", text):
            return iter(chr(c) for c in range(lo, lo + needed))
    raise TemplateError("cannot locate the messages: the conversation uses every marker alphabet")


# -- typed special-token strings ------------------------------------------------------------------


def _replace_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (a JSON-like tree) with `change` applied to every string, keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {_replace_strings(k, change): _replace_strings(v, change) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_strings(v, change) for v in value]
    return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def typed_spans(
    render: Callable[[list[dict[str, Any]], Any], str],
    messages: list[dict[str, Any]],
    tools: Any,
    full: str,
    special: re.Pattern,
) -> list[Span]:
    """Where special-token strings typed in the data are in `full` (empty when there are none)."""
    found = sorted({m.group() for s in _strings([messages, tools]) for m in special.finditer(s)})
    if not found:
        return []
    marks = dict(zip(found, alphabet_for(full, len(found)), strict=False))
    pattern = re.compile("|".join(re.escape(t) for t in sorted(found, key=len, reverse=True)))

    def change(s: str) -> str:
        return pattern.sub(lambda m: marks[m.group()], s)

    marked = render(_replace_strings(messages, change), _replace_strings(tools, change))
    tokens = {mark: token for token, mark in marks.items()}
    if marked.translate({ord(mark): token for mark, token in tokens.items()}) != full:
        raise TemplateError(
            "cannot keep typed special-token strings as text: the template renders this conversation "
            "differently when they are replaced"
        )
    spans, shift = [], 0
    for m in re.finditer("|".join(map(re.escape, tokens)), marked):
        token = tokens[m.group()]
        at = m.start() + shift
        spans.append((at, at + len(token)))
        shift += len(token) - 1
    return spans


def template_specials(full: str, special: re.Pattern | None, typed: list[Span]) -> list[Span]:
    """Special-token strings in `full` that the template wrote (not inside typed text)."""
    if special is None:
        return []
    starts = [a for a, _ in typed]
    out = []
    for m in special.finditer(full):
        k = bisect.bisect_right(starts, m.start()) - 1
        inside = k >= 0 and typed[k][1] > m.start()
        overlaps_next = k + 1 < len(typed) and typed[k + 1][0] < m.end()
        if not inside and not overlaps_next:
            out.append((m.start(), m.end()))
    return out


# -- field ends -------------------------------------------------------------------------------


def _count_leaves(messages: list[dict[str, Any]]) -> int:
    total = 0
    for m in messages:
        total += sum(1 for f in ("content", *TEMPLATE_REASONING_KEYS) if isinstance(m.get(f), str) and m[f])
        total += sum(1 for s in _strings(m.get("tool_calls") or []) if s)
    return total


def _mark_call(call: Any, mark: Callable[[str], str]) -> Any:
    """A tool call with `mark` applied to its name and argument strings (keys and values), never
    to the structure's own keys (`function`, `arguments`, ...) nor to its id, which templates match
    with the tool results' ids."""
    if not isinstance(call, dict):
        return call
    out = dict(call)
    function = call.get("function")
    if isinstance(function, dict):
        function = dict(function)
        if isinstance(function.get("name"), str) and function["name"]:
            function["name"] = mark(function["name"])
        function["arguments"] = _replace_strings(function.get("arguments"), lambda s: mark(s) if s else s)
        out["function"] = function
    return out


def field_ends(
    render: Callable[[list[dict[str, Any]], Any], str],
    messages: list[dict[str, Any]],
    tools: Any,
    full: str,
) -> tuple[list[list[tuple[int, str]]], Counter]:
    """Per message, where each of its rendered strings ends in `full`, with its field's name; and
    how many fields the data carries that the template did not render."""
    chars = alphabet_for(full, max(1, _count_leaves(messages)))
    owner: dict[str, tuple[int, str]] = {}

    def marker(i: int, name: str) -> Callable[[str], str]:
        def mark(s: str) -> str:
            # Before trailing whitespace, so that a template that trims the field trims the same.
            c = next(chars)
            owner[c] = (i, name)
            body = s.rstrip()
            return body + c + s[len(body) :]

        return mark

    marked_messages = []
    for i, m in enumerate(messages):
        out = dict(m)
        for name in ("content", *TEMPLATE_REASONING_KEYS):
            if isinstance(m.get(name), str) and m[name]:
                # Both reasoning keys are one field: rendered under either name, it is located.
                field = "content" if name == "content" else "reasoning_content"
                out[name] = marker(i, field)(m[name])
        if m.get("tool_calls"):
            mark = marker(i, "tool_calls")
            out["tool_calls"] = [_mark_call(call, mark) for call in m["tool_calls"]]
        marked_messages.append(out)
    if not owner:
        return [[] for _ in messages], Counter()
    marked = render(marked_messages, tools)
    if marked.translate(dict.fromkeys(map(ord, owner))) != full:
        raise TemplateError(
            "cannot locate the messages in the rendered template: the template changes other text "
            "depending on the messages' fields"
        )
    ends: list[list[tuple[int, str]]] = [[] for _ in messages]
    seen = set()
    for shift, m in enumerate(re.finditer(f"[{''.join(map(re.escape, owner))}]", marked)):
        i, name = owner[m.group()]
        ends[i].append((m.start() - shift, name))
        seen.add((i, name))
    dropped = Counter(name for i, name in set(owner.values()) if (i, name) not in seen)
    return ends, dropped


def text_between(specials: list[Span], length: int) -> list[Span]:
    """The text between the template's special tokens (all of it encoded as plain text)."""
    spans, at = [], 0
    for a, b in specials:
        if a > at:
            spans.append((at, a))
        at = b
    if at < length:
        spans.append((at, length))
    return spans


def outside_specials(at: int, specials: list[Span]) -> int:
    """`at`, moved back to the start of the template special token it falls inside (a prompt and
    a rendering can part inside one: `<|channel>` against `<|tool_call>`)."""
    k = bisect.bisect_right(specials, (at, 1 << 62)) - 1
    if k >= 0 and specials[k][0] < at < specials[k][1]:
        return specials[k][0]
    return at


def turn_end_without_stop(end: int, bound: int, specials: list[Span]) -> int:
    """Where a turn without a stop token ends: at the template's next special token after its
    last field (the next header: GLM's `<|observation|>`), which takes in the markup that closes
    the field (`</arg_value></tool_call>`); at the field's end when none comes before `bound`."""
    k = bisect.bisect_left(specials, (end, 0))
    if k < len(specials) and specials[k][0] <= bound:
        return specials[k][0]
    return end


def last_field_end(ends: list[tuple[int, str]], start: int, bound: int, stops: list[int]) -> int | None:
    """The end of a turn's last rendered field, among the message's field ends after `start` and
    up to `bound` (the next message's first field end). Content and reasoning are rendered once, so
    the last of theirs counts wherever it is (DeepSeek-R1 writes the content after the calls' stop
    token); tool-call strings may be repeated outside the turn (a tool's name in its result), so
    theirs count up to the first stop token after the turn's first field."""
    inside = sorted((p, name) for p, name in ends if start < p <= bound)
    if not inside:
        return None
    last = max((p for p, name in inside if name != "tool_calls"), default=None)
    calls = [p for p, name in inside if name == "tool_calls"]
    if calls:
        k = bisect.bisect_left(stops, inside[0][0])
        closed = stops[k] if k < len(stops) else bound
        calls_end = max((p for p in calls if p <= max(closed, inside[0][0])), default=None)
        if calls_end is not None:
            last = calls_end if last is None else max(last, calls_end)
    return last


# -- where a turn starts ------------------------------------------------------------------------


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def turn_start(prompt: str, history: Callable[[], str], full: str, data_end: int) -> int:
    """Where a turn's output starts in `full`, given `prompt` (the conversation before the turn
    with the generation prompt), `history()` (the same without the generation prompt) and
    `data_end` (where the last field of the messages before the turn ends in `full`).

    When the prompt is a prefix of `full`, at its end. When they part after `data_end`, inside the
    header or the generation prompt (it opens a block this turn does not have), where they part.
    When they part earlier (the
    template renders earlier turns differently when they are not followed by this one, e.g. it
    keeps their reasoning), the end of the history is found in `full` by aligning the two, and the
    generation prompt is matched from there."""
    at = common_prefix(prompt, full)
    if at == len(prompt):
        return at
    if at >= data_end:
        return _match_header(prompt, full, at)
    before = history()
    if not prompt.startswith(before) or at >= len(before):
        raise TemplateError("cannot locate a turn: the template renders its prompt differently")
    matcher = difflib.SequenceMatcher(None, before[at:], full[at:], autojunk=False)
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    if not blocks or blocks[-1].a + blocks[-1].size != len(before) - at:
        raise TemplateError("cannot locate a turn: the conversation before it renders differently on its own")
    end = at + blocks[-1].b + blocks[-1].size
    return _match_header(prompt[len(before) :], full[end:], 0) + end


def _match_header(prompt: str, full: str, at: int) -> int:
    """Where the rest of `prompt` (equal to `full` up to `at`) ends in `full`, when runs of
    whitespace may differ in length (a template indents its generation prompt differently from
    the same header in the conversation); where they part, when other text differs."""
    while at > 0 and prompt[at - 1].isspace():  # back to the start of the whitespace run
        at -= 1
    p = f = at
    while p < len(prompt) and f < len(full):
        if prompt[p].isspace() and full[f].isspace():
            p_end, f_end = _run_end(prompt, p), _run_end(full, f)
            if p_end == len(prompt):  # the prompt ends in whitespace: that much of the run
                return f + min(p_end - p, f_end - f)
            p, f = p_end, f_end
        elif prompt[p] == full[f]:
            p, f = p + 1, f + 1
        else:
            break
    return f


def skip_space_before(text: str, at: int, end: int, content: str) -> int:
    """`at` moved past whitespace when the content follows it (template indentation before the
    reply); unchanged when markup follows (`\n<tool_call>` is the model's to write)."""
    head = content.lstrip()[:16]
    skipped = at
    while skipped < end and text[skipped].isspace():
        skipped += 1
    return skipped if head and skipped > at and text.startswith(head, skipped) else at


def _run_end(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at
