"""Chat templates are code from a tokenizer or a downloaded file: rendering is sandboxed and bounded,
and a template that misbehaves is a TemplateError naming what it did, never a traceback or a hang.
The bounds change nothing for real templates (rendered here against plain Jinja)."""

from __future__ import annotations

from datetime import datetime

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from exemplar.data.templates import BUILTIN_NAMES, _GenerationTag, _tojson, builtin_template, render
from exemplar.errors import TemplateError
from tests.conftest import shared_data_dir

HOSTILE = {
    "a huge range": ("{% for i in range(10**9) %}x{% endfor %}", "exceed"),
    "nested loops for hours": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "more than 1,000,000 range items",
    ),
    "a string times 10**8": ("{{ 'a' * 10**8 }}", "repeated string"),
    "str.ljust(10**9)": ("{{ 'a'.ljust(10**9) }}", "exceed"),
    "the center filter": ("{{ 'a'|center(10**9) }}", "filter argument"),
    "a huge power": ("{{ 2 ** 100000000 }}", "65,536 bits"),
    "endless recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    "doubling through a macro": (
        "{% macro f(n, s) %}{% if n %}{{ f(n-1, s ~ s) }}{% endif %}{% endmacro %}{{ f(200, 'ab') }}",
        "exceed",
    ),
    "doubling with ~ in a loop": (
        "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "exceed",
    ),
    "doubling with + in a loop": (
        "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "exceed",
    ),
    "growing by replace": (
        "{% set ns = namespace(s='a'*1000) %}{% for i in range(10) %}"
        "{% set ns.s = ns.s|replace('a', 'aaaaaaaaaa') %}{% endfor %}",
        "filter result",
    ),
    "reaching object subclasses": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "reaching os through cycler": ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "unsafe"),
    "reaching os through lipsum": ("{{ lipsum.__globals__['os'].popen('id').read() }}", "unsafe"),
    "mutating a list": ("{% set x = [] %}{{ x.append(1) }}", "unsafe"),
    "a type error": ("{{ messages + 1 }}", "TypeError"),
}

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <|im_end|> there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Hello again."},
]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_is_a_clear_error(name):
    source, message = HOSTILE[name]
    with pytest.raises(TemplateError, match=message):
        render(source, MESSAGES)


def _plain_jinja(source: str, **variables) -> str:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(jinja2.TemplateError(m))
    return env.from_string(source).render(messages=MESSAGES, **variables)


def _real_templates() -> list[tuple[str, str]]:
    found = [(f"builtin/{n}", builtin_template(n).source) for n in BUILTIN_NAMES]
    for folder in ("chat_templates", "chat_templates_tools"):
        for path in sorted((shared_data_dir() / folder).glob("*.jinja")):
            found.append((f"{folder}/{path.name}", path.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize(("name", "source"), _real_templates(), ids=[n for n, _ in _real_templates()])
def test_the_bounds_change_nothing_for_real_templates(name, source):
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    for generation in (False, True):
        try:
            expected = _plain_jinja(source, add_generation_prompt=generation, tools=None, **special)
        except jinja2.TemplateError:
            continue  # the template itself refuses this conversation (e.g. strict role order)
        assert render(source, MESSAGES, add_generation_prompt=generation, special=special) == expected
