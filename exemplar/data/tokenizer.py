"""Load a tokenizer, give it the chat template, and add the special tokens the template needs."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from exemplar.config import Config
from exemplar.data.templates import ChatTemplate, resolve_template
from exemplar.errors import ExemplarError

log = logging.getLogger(__name__)


@dataclass
class TokenizerBundle:
    tokenizer: Any  # a transformers fast tokenizer, with the chosen template as its chat_template
    template: ChatTemplate
    added_tokens: list[str] = field(default_factory=list)  # added here: the model must resize embeddings

    @property
    def variables(self) -> dict[str, str]:
        """Variables a chat template may use (bos_token, eos_token, ...)."""
        tok = self.tokenizer
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {name: str(getattr(tok, name) or "") for name in names}

    @property
    def special_tokens(self) -> list[str]:
        tok = self.tokenizer
        specials = set(tok.all_special_tokens)
        specials.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
        return sorted(specials)

    def fingerprint(self) -> str:
        """Changes whenever tokenization could change: vocabulary, merges, added tokens, template."""
        h = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode())
        h.update(json.dumps([self.template.source, self.added_tokens, self.variables]).encode())
        return h.hexdigest()[:16]


def load_tokenizer(config: Config, tokenizer: Any = None) -> TokenizerBundle:
    """The config's tokenizer, with its chat template and special tokens; or, when `tokenizer` (an
    already loaded fast tokenizer) is given, that one prepared the same way instead of loading."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return prepare_tokenizer(
            tokenizer, config.chat_template and _template_path(config), config.special_tokens
        )
    source = config.tokenizer_source()
    trust = bool(config.model and config.model.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ExemplarError(f"cannot load the tokenizer from '{source}': {e}") from None
    return prepare_tokenizer(tok, config.chat_template and _template_path(config), config.special_tokens)


def _template_path(config: Config) -> str:
    spec = config.chat_template or ""
    return spec if "/" not in spec and not spec.endswith(".jinja") else config.resolve_path(spec)


def prepare_tokenizer(
    tok: Any, chat_template: str | None, extra_special: list[str] | None = None
) -> TokenizerBundle:
    """Attach the template and add missing special tokens; usable on any loaded fast tokenizer."""
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise ExemplarError(
            f"{type(tok).__name__} is a slow (Python) tokenizer; Exemplar needs a fast tokenizer "
            "(one with a tokenizer.json, or a SentencePiece model that transformers can convert)"
        )
    template = resolve_template(chat_template, tok.chat_template)
    wanted = list(dict.fromkeys([*template.special_tokens, *(extra_special or [])]))
    vocab = tok.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        # transformers 5 names the list "extra_special_tokens" (was "additional_special_tokens").
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        log.info("added special tokens for the chat template: %s", ", ".join(missing))
    if tok.pad_token is None:
        # Padding positions are masked by length, never by id, so pad == eos cannot hide a trained EOS.
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.chat_template = template.source
    return TokenizerBundle(tokenizer=tok, template=template, added_tokens=missing)
