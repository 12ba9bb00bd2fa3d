"""Shared set-up for the tool-call and reasoning mask tests: the twenty real templates, the Llama 2
tokenizer with each template's control tokens added as specials, and the checks of issue 9's rule
(training ids are the inference ids; trained text is the assistant's rendered output + stop token)."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from exemplar.data.encode import Encoder
from exemplar.data.masking import ChatMasker
from exemplar.data.schema import IGNORE_INDEX, Conversation
from exemplar.data.templates import BUILTIN_NAMES
from exemplar.data.tokenizer import prepare_tokenizer
from exemplar.errors import TemplateError
from tests.conftest import shared_data_dir
from tests.tokenizers_util import llama2_tokenizer

TOOL_TEMPLATES = [
    "Apriel-1.6-15b-Thinker-fixed",
    "ByteDance-Seed-OSS",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
    "LFM2.5-8B-A1B",
    "NVIDIA-Nemotron-Nano-v2",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "gemma4",
    "glm_4_5",
    "moonshotai-Kimi-K2",
    "unsloth-MiniMax-M2",
]
CHAT_TEMPLATES = ["alpaca", "chatml", "llama-3-instruct", "mistral-instruct", "zephyr"]
ALL = [*(f"tools/{n}" for n in TOOL_TEMPLATES), *(f"shared/{n}" for n in CHAT_TEMPLATES), *BUILTIN_NAMES]

# The control tokens these templates write, as their real tokenizers have them (special tokens):
# `<|...|>`, `<|...>`, `<...|>`, DeepSeek's full-width `<｜...｜>`, `<SPECIAL_n>`, `<seed:...>`, MiniMax's
# role markers, GLM's prefix.
_CONTROL = re.compile(
    r"<\|[^<>\s]*?\|>|<\|[^<>\s|]+>|<[^<>\s|/]+\|>|<｜[^｜]+｜>|<SPECIAL_\d+>|<seed:[a-z_]+>"
    r"|\[e~\[|\]~!b\[|\]~b\]|\[gMASK\]|<sop>"
)


def template_path(name: str) -> str:
    kind, _, stem = name.partition("/")
    if not stem:
        return name  # a built-in
    folder = "chat_templates_tools" if kind == "tools" else "chat_templates"
    path = shared_data_dir() / folder / f"{stem}.jinja"
    if not path.is_file():
        pytest.skip(f"shared chat templates not found at {path.parent}")
    return str(path)


_SETUPS: dict = {}


def setup(name: str, mask=None):
    """(tokenizer, encoder) for a template: Llama 2 with the template's control tokens added, and
    `strftime_now` rendering today's date, as transformers does (LFM2.5 prints it)."""
    key = (name, None if mask is None else mask.model_dump_json())
    if key not in _SETUPS:
        tok = llama2_tokenizer()
        if tok is None:
            pytest.skip("the Llama 2 tokenizer is not in the shared data folder")
        path = template_path(name)
        source = Path(path).read_text(encoding="utf-8") if path.endswith(".jinja") else ""
        bundle = prepare_tokenizer(tok, path, sorted(set(_CONTROL.findall(source))))
        masker = ChatMasker(
            bundle.template,
            bundle.variables,
            bundle.special_tokens,
            mask,
            template_date=date.today().isoformat(),
        )
        _SETUPS[key] = (bundle.tokenizer, Encoder(bundle.tokenizer, masker, max_length=1_000_000))
    return _SETUPS[key]


def renders(encoder: Encoder, conv: Conversation) -> bool:
    """Whether the template can render the conversation at all (some refuse tool roles)."""
    try:
        encoder.masker.render([m.to_template_dict() for m in conv.messages], conv.tools)
    except TemplateError:
        return False
    return True


def encode(encoder: Encoder, conv: Conversation):
    result = encoder.encode([conv])[0]
    assert result.drop_reason is None, (result.drop_reason, result.detail)
    return result


def inference_ids(tokenizer, conv: Conversation) -> list[int]:
    messages = [m.to_template_dict() for m in conv.messages]
    return list(tokenizer.apply_chat_template(messages, tools=conv.tools, tokenize=True, return_dict=False))


def trained_texts(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for token, label in zip([*ids, None], [*labels, IGNORE_INDEX], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(
                tokenizer.decode(current, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            )
            current = []
    return runs


def trained_characters(tokenizer, rendered: str, ids: list[int], labels: list[int]) -> list[bool]:
    """Per character of the rendered text: is it inside a trained token (the tokenizer's offsets of
    the whole text, whose ids are the training ids when no special-token string is typed)."""
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == ids
    flags = [False] * len(rendered)
    for (s, e), label in zip(encoding["offset_mapping"], labels, strict=True):
        if label != IGNORE_INDEX:
            flags[s:e] = [True] * (e - s)
    return flags


def assert_marks(rendered: str, flags: list[bool], trained: list[str], untrained: list[str]) -> None:
    """Every occurrence of each `trained` string in the rendering is trained in full; no character
    of any occurrence of an `untrained` string is."""
    for word in trained:
        for m in re.finditer(re.escape(word), rendered):
            assert all(flags[m.start() : m.end()]), (word, m.start())
    for word in untrained:
        for m in re.finditer(re.escape(word), rendered):
            assert not any(flags[m.start() : m.end()]), (word, m.start())
