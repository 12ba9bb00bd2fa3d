"""One pad-id rule for training, generation and export."""

from __future__ import annotations

import pytest

from exemplar.model.export import export_generation_config
from exemplar.model.special_ids import pad_token_id
from tests.tokenizers_util import trained_tokenizer
from tests.train_helpers import tiny_model


def _tokenizer(pad: bool, eos: bool):
    tok = trained_tokenizer("bytelevel")
    if not pad:
        tok.pad_token = None
    if not eos:
        tok.eos_token = None
    return tok


def test_pad_then_eos_then_the_first_stop_then_the_default():
    with_pad = _tokenizer(pad=True, eos=True)
    assert pad_token_id(with_pad, [7]) == with_pad.convert_tokens_to_ids("<pad>")
    eos_only = _tokenizer(pad=False, eos=True)
    assert pad_token_id(eos_only, [7]) == eos_only.convert_tokens_to_ids("</s>")
    neither = _tokenizer(pad=False, eos=False)
    assert pad_token_id(neither, [7, 9]) == 7
    assert pad_token_id(neither) == 0 and pad_token_id(neither, default=None) is None
    assert pad_token_id(None) == 0  # pre-tokenized rows, no tokenizer


@pytest.mark.parametrize("pad", [True, False])
def test_the_exported_generation_config_pads_as_generation_does(pad):
    tok = _tokenizer(pad=pad, eos=True)
    model = tiny_model("llama")
    stops = [tok.convert_tokens_to_ids("<s>")]  # a stop token other than eos
    config = export_generation_config(model, tok, stops)
    assert config.pad_token_id == pad_token_id(tok, stops)
    assert config.pad_token_id == (tok.pad_token_id if pad else tok.eos_token_id)
