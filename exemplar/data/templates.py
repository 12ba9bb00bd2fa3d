"""Chat templates: the tokenizer's own, a Jinja file, or a built-in written by this project.

Rendering uses a sandboxed Jinja environment configured like transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, a JSON `tojson`), so a template
renders here exactly as it does there. We compile it ourselves rather than call transformers'
private helpers because the masking code renders each conversation several times with
placeholders and needs a stable, fast entry point.
"""

from __future__ import annotations

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
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
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
) -> str:
    """Render one conversation. `special` supplies bos_token/eos_token/... variables.

    Equivalent to `template.render(...)`, whose context merges the environment's globals into a
    new dict on every call; the masker renders every conversation, so the merge is done once."""
    template, base = _compiled_with_globals(source)
    variables = {
        **base,
        **(special or {}),
        "messages": messages,
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.environment.concat(  # type: ignore[attr-defined]
            template.root_render_func(template.new_context(variables, shared=True))
        )
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template rejected this conversation: {e}") from None


@lru_cache(maxsize=32)
def _compiled_with_globals(source: str) -> tuple[jinja2.Template, dict[str, Any]]:
    template = compile_template(source)
    return template, dict(template.globals)
