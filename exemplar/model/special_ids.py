"""The one rule for the padding token id, used by training, generation and export.

Padding is never attended to by real tokens and never trained (labels mask it), so any id works for
the loss; what matters is that every part of Exemplar picks the same one, and that the exported
generation config agrees with the model config. The tokenizer's pad token when it has one, else its
end-of-sequence token (the usual choice for tokenizers without a pad token), else the chat
template's first stop token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

Default = TypeVar("Default", int, None)


def pad_token_id(tokenizer: Any, stop_ids: Sequence[int] = (), default: Default = 0) -> int | Default:
    """The tokenizer's pad id, else its eos id, else the first of `stop_ids`, else `default`.

    `tokenizer` may be None (a run on pre-tokenized rows without a tokenizer): then `stop_ids` or
    `default` decide.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return int(stop_ids[0]) if stop_ids else default
