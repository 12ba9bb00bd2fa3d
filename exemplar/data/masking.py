"""Exact loss masks for any chat template, with no `{% generation %}` tags and no per-model tables.

How it works. The template is rendered once with the real conversation (`full`), and once with
every message's content replaced by a unique placeholder (the "skeleton"). Substituting the real
contents back into the skeleton must give `full` again: when it does, we know to the character
where each message's content sits in `full`. Templates that `| trim` content are handled by trying
stripped contents, and any other local rewrite by rendering one placeholder at a time and
matching the text before and after it. Nothing is searched for by string matching in the
content, so a content that repeats the template's markup (or the user's text) cannot confuse it.

A trained region is an assistant message's rendered text plus the template's stop token that
closes the turn (found by rendering a probe conversation once), and any template text between
them such as rendered tool calls. The pieces returned here keep message content apart from
template text, so the tokenizer can encode content with special-token parsing switched off.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from exemplar.config import MaskConfig
from exemplar.data import locate
from exemplar.data.schema import Conversation
from exemplar.data.templates import DEFAULT_TEMPLATE_DATE, ChatTemplate, render
from exemplar.errors import TemplateError

log = logging.getLogger(__name__)

# Private-use characters: they never occur in real text and survive `| trim`, `| upper` aside.
_OPEN, _CLOSE = "\ue000", "\ue001"


def placeholder(i: int) -> str:
    return f"{_OPEN}{i}{_CLOSE}"


@dataclass
class Piece:
    text: str
    content: bool  # part of a message's content: encoded as plain text, never as control tokens
    trained: bool


@dataclass
class RenderedChat:
    text: str
    pieces: list[Piece]
    turns_without_stop: int  # trained turns whose stop token was not found
    # Fields the data carries that the template did not render ("content", "reasoning_content",
    # "tool_calls"), one count per message: e.g. the reasoning of earlier turns, or tool calls on a
    # template that has no syntax for them.
    dropped_fields: Counter = field(default_factory=Counter)


Span = tuple[int, int]


class ChatMasker:
    """Renders conversations with a template and splits the text into trained/untrained pieces."""

    def __init__(
        self,
        template: ChatTemplate,
        variables: dict[str, str],
        special_tokens: list[str],
        mask: MaskConfig | None = None,
        template_date: str = DEFAULT_TEMPLATE_DATE,
    ):
        self.template = template
        self.variables = variables  # bos_token, eos_token, ... as the template sees them
        self.special_tokens = sorted({t for t in special_tokens if t}, key=len, reverse=True)
        # Leftmost-longest, as the tokenizer's split at added tokens.
        self._special = (
            re.compile("|".join(map(re.escape, self.special_tokens))) if self.special_tokens else None
        )
        self.mask = mask or MaskConfig()
        self.template_date = template_date  # what `strftime_now` renders (deterministic masks, cache)
        self.dropped_warned: set[str] = set()
        self._skeletons: OrderedDict[tuple, _Skeleton] = OrderedDict()
        self.stop_token = self._probe_stop_token()
        self.header_not_in_prompt = self._probe_header()

    # -- rendering -------------------------------------------------------------------------

    def render(
        self, messages: list[dict[str, Any]], tools: Any = None, add_generation_prompt: bool = False
    ) -> str:
        return render(
            self.template.source,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            special=self.variables,
            date=self.template_date,
        )

    def _skeleton(self, messages: list[dict[str, Any]], tools: Any) -> _Skeleton:
        """The template rendered with placeholders, and where each placeholder is in it.

        Conversations of the same shape (roles, which contents are empty, every non-content
        field, tools) share a skeleton; a bounded number of them is cached.
        """
        key = _shape_key(messages, tools)
        found = self._skeletons.get(key)
        if found is None:
            filled = [i for i, m in enumerate(messages) if m["content"] == placeholder(i)]
            found = _Skeleton(self.render(messages, tools), filled)
            self._skeletons[key] = found
            if len(self._skeletons) > 4096:
                self._skeletons.popitem(last=False)
        else:
            self._skeletons.move_to_end(key)
        return found

    # -- the stop token ---------------------------------------------------------------------

    def _probe_stop_token(self) -> str | None:
        """The special token that closes an assistant turn, from a probe conversation: user P0,
        assistant P1, user P2, assistant P3.

        The closer is what follows both P1 and P3 (after P1 the next header comes, after P3 the
        end, or whatever the template appends): `<|im_end|>`, `<|eot_id|>`, Nemotron's
        `<SPECIAL_12>`; of several, the first that also closes the user's turn (stands between P0
        and P1), so Command R's turn ends with `<|END_OF_TURN_TOKEN|>` after `<|END_RESPONSE|>`.
        When nothing follows P3 (templates that close only earlier turns), the first token after
        P1 that is not part of the user's header (what stands before P0): Apriel's `<|end|>`, but
        none for GLM, whose next header is all that follows."""
        u, a, u2, a2 = (placeholder(k) for k in range(4))
        probes = [
            [
                {"role": "user", "content": u},
                {"role": "assistant", "content": a},
                {"role": "user", "content": u2},
                {"role": "assistant", "content": a2},
            ],
            [
                {"role": "user", "content": u},
                {"role": "assistant", "content": a},
                {"role": "user", "content": u2},
            ],
            [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
            [
                {"role": "system", "content": placeholder(4)},
                {"role": "user", "content": u},
                {"role": "assistant", "content": a},
            ],
        ]
        for probe in probes:
            try:
                text = self.render(probe)
            except TemplateError:
                continue
            at = [text.find(placeholder(k)) for k in range(len(probe) if len(probe) < 4 else 4)]
            if (
                at[0] < 0
                or at[1] < at[0]
                or (len(at) > 2 and at[2] < at[1])
                or (len(at) > 3 and at[3] < at[2])
            ):
                continue
            after_end = at[2] if len(at) > 2 else len(text)
            after = self._specials_in(text[at[1] + len(a) : after_end])
            closing_user = set(self._specials_in(text[at[0] + len(u) : at[1]]))
            if len(at) > 3:
                last = self._specials_in(text[at[3] + len(a2) :])
                closer = []
                for x, y in zip(after, last, strict=False):
                    if x != y:
                        break
                    closer.append(x)
                if closer:
                    return next((t for t in closer if t in closing_user), closer[0])
            user_header = set(self._specials_in(text[: at[0]]))
            return next((t for t in after if t not in user_header), None)
        return None

    def _probe_header(self) -> str:
        """For a template without a generation prompt: the text of the assistant's header that the
        prompt lacks (`assistant: `), which is not the model's output. Empty when the template has
        a generation prompt, or when what the prompt lacks is special tokens only (Command R's
        `<|START_RESPONSE|>`, which the model writes itself at inference)."""
        probe = [
            {"role": "user", "content": placeholder(0)},
            {"role": "assistant", "content": placeholder(1)},
        ]
        try:
            text = self.render(probe)
            prompt = self.render(probe[:1], add_generation_prompt=True)
            if prompt != self.render(probe[:1]):
                return ""  # the template has a generation prompt: it is the header
        except TemplateError:
            return ""
        at_u, at_a = text.find(placeholder(0)), text.find(placeholder(1))
        if at_u < 0 or at_a < at_u or not prompt.startswith(text[:at_u]):
            return ""
        header = text[at_u + len(placeholder(0)) : at_a]
        generated = prompt[at_u + len(placeholder(0)) :]
        rest = header[locate.common_prefix(header, generated) :]
        plain = self._special.sub("", rest) if self._special else rest
        return rest if plain.strip() else ""

    def _specials_in(self, text: str) -> list[str]:
        return [m.group() for m in self._special.finditer(text)] if self._special else []

    # -- content spans ----------------------------------------------------------------------

    def content_spans(self, messages: list[dict[str, Any]], tools: Any, full: str) -> list[Span | None]:
        """Where each message's content is in `full` (None for empty content)."""
        spans = self._spans_by_substitution(messages, tools, full)
        if spans is None:
            spans = [self._span_one_by_one(messages, tools, full, i) for i in range(len(messages))]
        return spans

    def _spans_by_substitution(self, messages, tools, full) -> list[Span | None] | None:
        found = self._substituted(messages, tools, full)
        if found is None:
            return None  # the template does more than place contents: locate one at a time
        skeleton, bodies = found
        spans: list[Span | None] = [None] * len(messages)
        length = 0
        for head, i in skeleton.layout:
            length += len(head)
            spans[i] = (length, length + len(bodies[i]))
            length += len(bodies[i])
        return spans

    def _substituted(self, messages, tools, full) -> tuple[_Skeleton, dict[int, str]] | None:
        """The conversation's skeleton and each placed message's body (its content, or its content
        stripped for templates that `| trim`), when the bodies substituted for the placeholders
        give `full`; None when they do not (or a placeholder was dropped or repeated)."""
        skeleton = self._skeleton(
            [dict(m, content=placeholder(i)) if m["content"] else m for i, m in enumerate(messages)], tools
        )
        layout = skeleton.layout
        if layout is None:
            return None
        for transform in (None, str.strip):
            bodies = {}
            parts = []
            for head, i in layout:
                body = messages[i]["content"] if transform is None else transform(messages[i]["content"])
                bodies[i] = body
                parts += [head, body]
            parts.append(skeleton.tail)
            if "".join(parts) == full:
                return skeleton, bodies
        return None

    def _span_one_by_one(self, messages, tools, full, i) -> Span | None:
        if not messages[i]["content"]:
            return None
        text = self.render(
            [dict(m, content=placeholder(i)) if j == i else m for j, m in enumerate(messages)], tools
        )
        at = text.find(placeholder(i))
        if at < 0:
            return None  # the template does not show this message's content (e.g. old reasoning)
        before, after = text[:at], text[at + len(placeholder(i)) :]
        unique = text.count(placeholder(i)) == 1
        if (
            unique
            and len(before) + len(after) <= len(full)
            and full.startswith(before)
            and full.endswith(after)
        ):
            return (len(before), len(full) - len(after))
        raise TemplateError(
            f"cannot locate message {i} ({messages[i]['role']}) in the rendered template: the template "
            "changes other text depending on this message's content"
        )

    # -- trained regions --------------------------------------------------------------------

    def trained_messages(self, conv: Conversation) -> list[int]:
        if self.mask.train_on_everything:
            return list(range(len(conv.messages)))
        chosen = [
            i
            for i, m in enumerate(conv.messages)
            if m.train is True or (m.train is None and m.role in self.mask.train_roles)
        ]
        if self.mask.last_turn_only and chosen:
            chosen = [chosen[-1]]
        return chosen

    def nothing_to_train(self, conv: Conversation) -> str | None:
        """Why the conversation would train nothing (None when it trains something): no message
        of a trained role, or every trained message empty. Such a row is invalid, not dropped."""
        if self.mask.train_on_everything:
            return None
        chosen = [conv.messages[i] for i in self.trained_messages(conv)]
        roles = " or ".join(self.mask.train_roles) or "trained"
        if not chosen:
            return f"nothing to train: no {roles} message (or every one is marked train: false)"
        if all(not m.content.strip() and not m.tool_calls and not m.reasoning_content for m in chosen):
            return f"nothing to train: every {roles} message is empty"
        return None

    def render_pieces(self, conv: Conversation) -> RenderedChat:
        messages = [m.to_template_dict() for m in conv.messages]
        full = self.render(messages, conv.tools)
        fast = self._pieces_from_recipe(conv, messages, full) if self._plain(conv) else None
        rendered = fast if fast is not None else self._render_pieces_located(conv, messages, full)
        for name in rendered.dropped_fields.keys() - self.dropped_warned:
            self.dropped_warned.add(name)
            log.warning(
                "the chat template does not render the %s of some messages: they are not trained "
                "(counted per source as dropped fields)",
                name,
            )
        return rendered

    def _plain(self, conv: Conversation) -> bool:
        """Contents only: no tool calls, no reasoning, and no special-token string typed anywhere
        but in a content (which the fast path keeps as text itself)."""
        special = self._special
        for m in conv.messages:
            if m.tool_calls or m.reasoning_content:
                return False
            if special and (
                (m.name and special.search(m.name)) or (m.tool_call_id and special.search(m.tool_call_id))
            ):
                return False
        return (
            conv.tools is None
            or special is None
            or not special.search(json.dumps(conv.tools, ensure_ascii=False))
        )

    # -- the general path (locate.py) ------------------------------------------------------

    def _render_pieces_located(
        self, conv: Conversation, messages: list[dict[str, Any]], full: str
    ) -> RenderedChat:
        """Pieces for any conversation: all text between the template's special tokens is encoded
        as plain text (so typed special-token strings stay text), cut at the trained regions."""
        typed = (
            locate.typed_spans(self.render, messages, conv.tools, full, self._special)
            if self._special
            else []
        )
        specials = locate.template_specials(full, self._special, typed)
        text_spans = locate.text_between(specials, len(full))
        if self.mask.train_on_everything:
            return RenderedChat(full, _cut(full, text_spans, [(0, len(full))]), 0)
        ends, dropped = locate.field_ends(self.render, messages, conv.tools, full)
        regions, missing = self._located_regions(conv, messages, full, ends, specials)
        return RenderedChat(full, _cut(full, text_spans, regions), missing, dropped)

    def _located_regions(self, conv, messages, full, ends, specials) -> tuple[list[Span], int]:
        """Each trained turn: from where its prompt stops matching `full` through the stop token
        after its last rendered field (messages of other trained roles: their content)."""
        stop = self.stop_token
        stops = [a for a, b in specials if full[a:b] == stop] if stop else []
        firsts = [min(p for p, _ in e) if e else None for e in ends]
        regions: list[Span] = []
        missing, floor = 0, 0
        spans = None
        for i in self.trained_messages(conv):
            m = conv.messages[i]
            if m.role == "assistant":
                if not ends[i] and not (m.tool_calls or m.reasoning_content):
                    continue  # an empty message: nothing to train
                data_end = max((p for e in ends[:i] for p, _ in e), default=0)
                start = self._turn_start(messages, conv.tools, full, i, data_end)
                start = max(floor, locate.outside_specials(start, specials))
            else:
                spans = spans or self.content_spans(messages, conv.tools, full)
                if spans[i] is None:
                    continue
                start = max(floor, spans[i][0])
            bound = min((f for f in firsts[i + 1 :] if f is not None and f > start), default=len(full))
            end = locate.last_field_end(ends[i], start, bound, stops)
            if end is None:
                end = start  # the template rendered none of its fields: its turn is the stop token
            else:  # template whitespace before the content is not the model's (`[/INST]\n\n  `)
                start = locate.skip_space_before(full, start, end, m.content)
            if self.mask.train_stop_token:
                k = bisect.bisect_left(stops, end)
                if k < len(stops) and stops[k] < bound:
                    end = stops[k] + len(stop)
                else:
                    end = locate.turn_end_without_stop(end, bound, specials)
                    missing += 1
            if end > start:
                regions.append((start, end))
            floor = max(floor, end)
        return regions, missing

    def _turn_start(self, messages, tools, full, i, data_end) -> int:
        try:
            prompt = self.render(messages[:i], tools, add_generation_prompt=True)
        except TemplateError as e:
            raise TemplateError(
                f"cannot locate message {i}: the template cannot render the prompt before it ({e})"
            ) from None
        start = locate.turn_start(prompt, lambda: self.render(messages[:i], tools), full, data_end)
        rest = self.header_not_in_prompt
        if rest and full.startswith(rest.lstrip(), locate.skip_space_before(full, start, len(full), rest)):
            start = locate.skip_space_before(full, start, len(full), rest) + len(rest.lstrip())
        return start

    # -- the fast path: one recipe per conversation shape ------------------------------------

    def _pieces_from_recipe(
        self, conv: Conversation, messages: list[dict[str, Any]], full: str
    ) -> RenderedChat | None:
        """The pieces of the general path, from a recipe cut once per skeleton and trained set.

        Valid when the real contents substituted into the skeleton give `full` (the template treats
        contents as opaque text), every content is non-empty, and no trained message is rendered
        without content: then every piece of template text, trained flag and stop token is the
        skeleton's, and only the contents change. Otherwise returns None (the general path).
        """
        found = self._substituted(messages, conv.tools, full)
        if found is None:
            return None
        skeleton, bodies = found
        if not all(bodies.values()):
            return None  # an empty content (after strip) would merge its neighbours differently
        trained = tuple(self.trained_messages(conv))
        recipe = skeleton.recipes.get(trained)
        if recipe is None:
            recipe = self._recipe(conv, messages, skeleton, trained)
            skeleton.recipes[trained] = recipe
        if recipe is _NO_RECIPE:
            return None
        items, missing, guards = recipe
        for i, char in guards:  # the content could continue the generation prompt: stay general
            first = messages[i]["content"][:1]
            if first == char or (char.isspace() and first.isspace()):
                return None
        pieces = [
            Piece(bodies[item[0]], True, item[1]) if isinstance(item, tuple) else item for item in items
        ]
        return RenderedChat(full, pieces, missing)

    def _recipe(self, conv: Conversation, messages, skeleton: _Skeleton, trained: tuple[int, ...]):
        """Cut the skeleton itself, its placeholders standing for the contents."""
        if any(i not in {j for _, j in skeleton.layout} and conv.messages[i].tool_calls for i in trained):
            return _NO_RECIPE  # a trained message without content: its start needs the real prompt
        text = skeleton.text
        spans: list[Span | None] = [None] * len(messages)
        length = 0
        for head, i in skeleton.layout:
            length += len(head)
            spans[i] = (length, length + len(placeholder(i)))
            length += len(placeholder(i))
        if self.mask.train_on_everything:
            regions, missing, guards = [(0, len(text))], 0, []
        else:
            skeleton_messages = [
                dict(m, content=placeholder(i)) if m["content"] else m for i, m in enumerate(messages)
            ]
            regions, missing, guards = self._regions(
                conv.messages, skeleton_messages, conv.tools, text, spans, trained
            )
        items: list[Piece | tuple[int, bool]] = []
        by_placeholder = {placeholder(i): i for _, i in skeleton.layout}
        for piece in _cut(text, spans, regions):
            if piece.content:
                if piece.text not in by_placeholder:
                    return _NO_RECIPE  # a cut inside a content: not expected, stay general
                items.append((by_placeholder[piece.text], piece.trained))
            else:
                items.append(piece)  # shared by every row of this shape: pieces are read-only
        return items, missing, guards

    def _regions(self, conv_messages, messages, tools, text, spans, trained):
        """Trained regions of a skeleton: each trained assistant turn from where its prompt stops
        matching (its content's start at the latest), other trained messages from their content,
        through the stop token that closes the turn. Also the guards: (message, character) where
        the generation prompt goes on past the content's start (`<think>\n`): a content that
        starts with that character could match more of it, so such a row takes the general path."""
        regions, missing, floor, guards = [], 0, 0, []
        starts = sorted(s[0] for s in spans if s is not None)
        for i in trained:
            span = spans[i]
            if span is None:
                continue  # nothing rendered for this message: nothing to train
            start = span[0]
            if conv_messages[i].role == "assistant":
                try:
                    data_end = max((s[1] for s in spans[:i] if s is not None), default=0)
                    start = max(floor, min(start, self._turn_start(messages, tools, text, i, data_end)))
                except TemplateError:
                    pass  # no prompt to compare with: the content's start
                if not text[start : span[0]].strip():
                    start = span[0]  # template whitespace before the content is not the model's output
                guard = self._prompt_past_content(messages, tools, text, i, span[0])
                if guard:
                    guards.append((i, guard))
            end = span[1]
            if self.mask.train_stop_token:
                stop_end = self._stop_end(text, end, starts)
                if stop_end is None:
                    missing += 1
                else:
                    end = stop_end
            regions.append((start, end))
            floor = end
        return regions, missing, guards

    def _prompt_past_content(self, messages, tools, text, i, content_start) -> str:
        """The generation prompt's character at the content's start, when it goes on past it."""
        try:
            prompt = self.render(messages[:i], tools, add_generation_prompt=True)
        except TemplateError:
            return ""
        at = locate.common_prefix(prompt, text)
        return prompt[at] if at < len(prompt) and at >= content_start - 1 else ""

    def _stop_end(self, full: str, content_end: int, starts: list[int]) -> int | None:
        """End of the stop token that closes the turn whose content ends at `content_end`."""
        if self.stop_token is None:
            return None
        limit = next((s for s in starts if s >= content_end and s > 0), len(full))
        at = full.find(self.stop_token, content_end, limit)
        if at < 0:
            return None
        # Only template text may stand between the content and the stop token: no other control
        # token, which would mean we ran into the next turn's header.
        between = full[content_end:at]
        if any(tok in between for tok in self.special_tokens):
            return None
        return at + len(self.stop_token)

    # -- prompts for generation ---------------------------------------------------------------

    def prompt_pieces(self, messages: list[dict[str, Any]], tools: Any = None) -> list[Piece]:
        """The pieces of the prompt that precede an assistant reply, exactly as in training."""
        probe = [*messages, {"role": "assistant", "content": placeholder(len(messages))}]
        text = self.render(probe, tools)
        at = text.find(placeholder(len(messages)))
        if at < 0:
            raise TemplateError("the chat template does not render an assistant reply after these messages")
        spans = self.content_spans(probe, tools, text)
        return [p for p in _cut(text[:at], [s for s in spans[:-1]], []) if p.text]


def _cut(text: str, content_spans: list[Span | None], trained: list[Span]) -> list[Piece]:
    """Split text at every span boundary; merge neighbours with the same flags.

    Content spans never overlap one another, nor do trained regions, so one sweep over the
    sorted boundaries with a cursor into each list says which segment is content and trained.
    """
    n = len(text)
    spans = sorted((min(a, n), min(b, n)) for a, b in (s for s in content_spans if s is not None) if a < b)
    regions = sorted((min(a, n), min(b, n)) for a, b in trained)
    marks = {0, n}
    for a, b in spans:
        marks.add(a)
        marks.add(b)
    for a, b in regions:
        marks.add(a)
        marks.add(b)
    cuts = sorted(marks)
    pieces: list[Piece] = []
    si = ri = 0
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a == b:
            continue
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        while ri < len(regions) and regions[ri][1] <= a:
            ri += 1
        is_content = si < len(spans) and spans[si][0] <= a and b <= spans[si][1]
        is_trained = ri < len(regions) and regions[ri][0] <= a and b <= regions[ri][1]
        if pieces and not is_content and not pieces[-1].content and pieces[-1].trained == is_trained:
            pieces[-1].text += text[a:b]
        else:
            pieces.append(Piece(text[a:b], is_content, is_trained))
    return pieces


_NO_RECIPE = object()  # a shape the recipe cannot express: the general path handles it


class _Skeleton:
    """A rendering with placeholders: its text, and (when every placeholder of the `filled`
    messages appears exactly once) the template text before each placeholder in order of
    appearance, and the tail."""

    __slots__ = ("text", "layout", "tail", "recipes")

    def __init__(self, text: str, filled: list[int]):
        self.text = text
        self.layout: list[tuple[str, int]] | None = None
        self.tail = ""
        self.recipes: dict[tuple[int, ...], Any] = {}  # trained messages -> cut (see _recipe)
        found = []
        for i in filled:
            mark = placeholder(i)
            at = text.find(mark)
            if at < 0 or text.find(mark, at + 1) >= 0:
                return  # dropped or repeated by the template
            found.append((at, i))
        found.sort()
        layout, cursor = [], 0
        for at, i in found:
            layout.append((text[cursor:at], i))
            cursor = at + len(placeholder(i))
        self.layout, self.tail = layout, text[cursor:]


def _shape_key(messages: list[dict[str, Any]], tools: Any) -> tuple:
    """Everything a skeleton depends on: the placeholder messages and the tools (exact, cheap)."""
    parts: list[Any] = []
    for m in messages:
        if len(m) == 2 and "role" in m and "content" in m:
            parts.append((m["role"], m["content"]))
        else:
            parts.append(json.dumps(m, sort_keys=True, default=str))
    return (tuple(parts), None if tools is None else json.dumps(tools, sort_keys=True, default=str))
