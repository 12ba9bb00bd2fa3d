"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The project's own small tokenizer (exemplar/assets/tokenizer, built by scripts/build_tokenizer.py).
ASSET_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "exemplar" / "assets" / "tokenizer"


def shared_data_dir() -> Path:
    """The third-party reference data beside the project, or $EXEMPLAR_SHARED_DATA."""
    env = os.environ.get("EXEMPLAR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The reference data folder; tests using it skip where it is absent (a user's clone)."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (set EXEMPLAR_SHARED_DATA to its folder)")
    return path


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones. Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """The project's asset tokenizer (ChatML template, <|im_end|> special). Modules that need
    another one define their own `tokenizer` fixture."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def im_end(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


# Property tests explore the same examples on every run: a failure seen once is seen again.
settings.register_profile("exemplar", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("exemplar")
