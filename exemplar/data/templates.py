"""Chat templates: the tokenizer's own, a Jinja file, or a built-in written by this project.

Rendering uses a sandboxed Jinja environment configured like transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, a JSON `tojson`), so a template
renders here exactly as it does there. A template is code from a tokenizer or a file the user
downloaded, so the sandbox is also bounded: no Python internals (Jinja's sandbox), at most
`MAX_RANGE_ITEMS` loop items from `range` per rendering, no string or list grown past
`MAX_RENDERED_CHARS` by `*`, `**` or a padding method, and no rendering longer than that; any
failure inside the template is a `TemplateError`, never a traceback. We compile it ourselves rather than call transformers'
private helpers because the masking code renders each conversation several times with
placeholders and needs a stable, fast entry point.
"""

from __future__ import annotations

import contextvars
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace

from exemplar.errors import TemplateError

# Special tokens each built-in template needs in the vocabulary (added when the tokenizer lacks them).
BUILTIN_SPECIAL_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": [],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"],
    "zephyr": [],
    "alpaca": [],
}
BUILTIN_NAMES = tuple(BUILTIN_SPECIAL_TOKENS)

# Bounds on what one rendering may do (far above what a real template needs: a rendered
# conversation is text for at most a few hundred thousand tokens).
MAX_RENDERED_CHARS = 1 << 26
MAX_RANGE_ITEMS = 1_000_000
_range_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("range_budget")

# What `strftime_now` renders (config `data.template_date`): a fixed date, so that the rendering, the
# masks and the data cache are the same on every run. Use the day of training for templates that print
# "today's date" into the system prompt and should match what an inference server renders that day.
DEFAULT_TEMPLATE_DATE = "2026-01-01"

# Markers like <|im_end|> written literally in a template are control tokens of that template.
_CONTROL_MARKER = re.compile(r"<\|[A-Za-z0-9_.\-]+\|>")


@dataclass
class ChatTemplate:
    source: str
    name: str  # built-in name, file path, or "tokenizer"
    special_tokens: list[str] = field(default_factory=list)  # tokens the template needs as specials


def builtin_template(name: str) -> ChatTemplate:
    source = resources.files("exemplar.data").joinpath(f"builtin_templates/{name}.jinja").read_text("utf-8")
    return ChatTemplate(source=source, name=name, special_tokens=list(BUILTIN_SPECIAL_TOKENS[name]))


def resolve_template(spec: str | None, tokenizer_template: str | None) -> ChatTemplate:
    """Pick the template: a built-in name, a Jinja file, or (spec None) the tokenizer's own."""
    if spec is None:
        if not tokenizer_template:
            raise TemplateError(
                "the tokenizer has no chat template: set `chat_template:` to a built-in "
                f"({', '.join(BUILTIN_NAMES)}) or to a Jinja file"
            )
        if isinstance(tokenizer_template, dict):  # several named templates: use the default one
            tokenizer_template = tokenizer_template.get("default") or next(iter(tokenizer_template.values()))
        return ChatTemplate(tokenizer_template, "tokenizer", literal_control_markers(tokenizer_template))
    if spec in BUILTIN_SPECIAL_TOKENS:
        return builtin_template(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        source = path.read_text(encoding="utf-8")
        compile_template(source)  # fail early with a clear message
        return ChatTemplate(source, str(path), literal_control_markers(source))
    raise TemplateError(
        f"chat_template '{spec}' is neither a built-in ({', '.join(BUILTIN_NAMES)}) nor an existing Jinja file"
    )


def literal_control_markers(source: str) -> list[str]:
    """`<|...|>` markers written literally in the template's text or string constants."""
    env = _environment()
    try:
        ast = env.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template has a Jinja syntax error at line {e.lineno}: {e.message}"
        ) from None
    texts = [node.data for node in ast.find_all(jinja2.nodes.TemplateData)]
    texts += [node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)]
    found: dict[str, None] = {}
    for text in texts:
        for marker in _CONTROL_MARKER.findall(text):
            found[marker] = None
    return list(found)


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tags) and
    render the body unchanged: our masks never depend on these tags."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    # Like transformers: Jinja's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"{what} would exceed {MAX_RENDERED_CHARS:,} characters")


def _check_sizes(what: str, values: Any) -> None:
    """Refuse sizes (ints) or sequences past the bound among `values`."""
    for v in values:
        if (isinstance(v, int) and v > MAX_RENDERED_CHARS) or (
            isinstance(v, (str, list, tuple)) and len(v) > MAX_RENDERED_CHARS
        ):
            raise _too_big(what)


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` through `environment.bounded_concat` (Jinja's documented `code_generator_class`
    extension point), so a string doubled in a loop or a macro is caught at the bound."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedNamespace(Namespace):
    """`namespace()`, the one object a template can grow across loop iterations: values bounded."""

    def __setitem__(self, name: str, value: Any) -> None:
        _check_sizes("a namespace value", (value,))
        super().__setitem__(name, value)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with bounds on size-growing operations, through Jinja's
    documented hooks: `intercepted_binops` / `call_binop` for `*`, `**` and `+`, `call` for
    functions, methods and macros, `code_generator_class` for `~`, and wrapped filters."""

    intercepted_binops = frozenset(["*", "**", "+"])
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_sizes("a repeated string or list", (len(seq) * n,))
        huge_power = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
        if operator == "**" and huge_power and left.bit_length() * right > 1 << 16:
            raise jinja2.exceptions.SecurityError("a power with more than 65,536 bits")
        result = super().call_binop(context, operator, left, right)
        if operator == "+":
            _check_sizes("a concatenated string or list", (result,))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # str.ljust(10**9), a macro passed a string doubled at every recursion, ...: refused up front.
        _check_sizes("an argument", (*args, *kwargs.values()))
        return super().call(__context, __obj, *args, **kwargs)

    def bounded_concat(self, parts: Any) -> str:
        text = "".join(map(str, parts))
        _check_sizes("a concatenated string", (text,))
        return text


def _bounded_filter(function: Any) -> Any:
    # Filters are called directly by compiled templates (not through `call`): `center(10**9)`,
    # `indent`, `replace` with a long replacement... sizes checked before and after.
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_sizes("a filter argument", (*args[1:], *kwargs.values()))
        result = function(*args, **kwargs)
        _check_sizes("a filter result", (result,))
        return result

    if hasattr(function, "jinja_pass_arg"):  # Jinja's pass_context/pass_environment mark
        bounded.jinja_pass_arg = function.jinja_pass_arg  # type: ignore[attr-defined]
    bounded.__name__ = getattr(function, "__name__", "filter")
    return bounded


def _budgeted_range(*args: int) -> range:
    """The sandbox's `range` (at most 100,000 items a call), with a budget for the whole rendering,
    so nested loops cannot run for hours."""
    items = safe_range(*args)
    budget = _range_budget.get(None)
    if budget is not None:
        budget[0] -= len(items)
        if budget[0] < 0:
            raise jinja2.exceptions.SecurityError(
                f"the template's loops ran over more than {MAX_RANGE_ITEMS:,} range items in one rendering"
            )
    return items


@lru_cache(maxsize=16)
def _date_formatter(date: str) -> Any:
    """`strftime_now(fmt)` that formats the fixed `date` (ISO, "2026-01-01" or with a time)."""
    try:
        moment = datetime.fromisoformat(date)
    except ValueError:
        raise TemplateError(f"template date '{date}' is not an ISO date such as 2026-01-01") from None
    return moment.strftime


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(f) for name, f in env.filters.items()})
    env.globals["range"] = _budgeted_range
    env.globals["namespace"] = _BoundedNamespace
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _date_formatter(DEFAULT_TEMPLATE_DATE)
    return env


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template has a Jinja syntax error at line {e.lineno}: {e.message}"
        ) from None


def render(
    source: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    special: dict[str, str] | None = None,
    date: str = DEFAULT_TEMPLATE_DATE,
) -> str:
    """Render one conversation. `special` supplies bos_token/eos_token/... variables; `date` is
    what `strftime_now` formats.

    Equivalent to `template.render(...)`, whose context merges the environment's globals into a
    new dict on every call; the masker renders every conversation, so the merge is done once."""
    template, base = _compiled_with_globals(source)
    variables = {
        **base,
        **(special or {}),
        "messages": messages,
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
        "strftime_now": _date_formatter(date),
    }
    token = _range_budget.set([MAX_RANGE_ITEMS])
    try:
        return _bounded_concat(template.root_render_func(template.new_context(variables, shared=True)))
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template rejected this conversation: {e}") from None
    except TemplateError:
        raise
    except (
        ArithmeticError,
        RecursionError,
        MemoryError,
        LookupError,
        TypeError,
        ValueError,
        AttributeError,
    ) as e:
        # A template bug or a hostile template (e.g. a macro calling itself): its row is reported.
        raise TemplateError(
            f"the chat template failed on this conversation: {type(e).__name__}: {e}"
        ) from None
    finally:
        _range_budget.reset(token)


def _bounded_concat(chunks: Any) -> str:
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise TemplateError(f"the chat template's output exceeds {MAX_RENDERED_CHARS:,} characters")
        parts.append(chunk)
    return "".join(parts)


@lru_cache(maxsize=32)
def _compiled_with_globals(source: str) -> tuple[jinja2.Template, dict[str, Any]]:
    template = compile_template(source)
    return template, dict(template.globals)
