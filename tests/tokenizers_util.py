"""Tokenizers for tests: the real Llama 2 tokenizer (when the shared data is present) and small
ones trained here in a second, so masking is tested on several pre-tokenizer families."""

from __future__ import annotations

import copy
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.conftest import ASSET_TOKENIZER_DIR, shared_data_dir

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b  # code with indentation",
    "Ünïcödé text: naïve café, 日本語, emoji 🙂, math ∑ x² ≤ 10.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "[INST] ### Instruction: ### Response: <|user|> <|assistant|> system tool",
] * 20


@lru_cache(maxsize=1)
def _llama2():
    path = shared_data_dir() / "llama2-tokenizer"
    if not path.is_dir():
        return None
    return AutoTokenizer.from_pretrained(str(path))


def llama2_tokenizer():
    """A fresh copy of the real Llama 2 tokenizer, or None when the shared data is absent."""
    tok = _llama2()
    return copy.deepcopy(tok) if tok is not None else None


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@lru_cache(maxsize=4)
def _trained(kind: str) -> str:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "bytelevel":  # GPT-2 / Llama 3 / Qwen family, with a leading-space option switched on
        backend = Tokenizer(models.BPE(unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "metaspace_first":  # newer SentencePiece conversions (Mistral v0.3): no normalizer,
        # a Metaspace pre-tokenizer that prepends "▁" to the input's first section and does not split
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + byte_tokens)
    else:  # SentencePiece family (Llama 2 / Mistral / Gemma) with the prefix space on every call
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        # "sentencepiece": trained on words, used on whole texts with no pre-tokenizer, as the
        # tokenizer.json files converted from SentencePiece models (Llama 2, Mistral) are.
        split = kind == "sentencepiece"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=split)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + byte_tokens)
    backend.train_from_iterator(CORPUS, trainer)
    if kind == "sentencepiece":
        backend.pre_tokenizer = None
    if kind == "metaspace_first":  # trained on words, used on whole texts
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return backend.to_str()


def trained_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """'bytelevel', 'metaspace', 'sentencepiece' or 'metaspace_first': a small tokenizer trained on
    the corpus above."""
    return _wrap(Tokenizer.from_str(_trained(kind)))


def make_tokenizer(kind: str):
    """A tokenizer by name: 'asset' (the project's own), 'llama2' (skips the test when the
    shared data is absent), or one of `trained_tokenizer`'s kinds."""
    import pytest

    if kind == "asset":
        return AutoTokenizer.from_pretrained(ASSET_TOKENIZER_DIR)
    if kind == "llama2":
        tok = llama2_tokenizer()
        if tok is None:
            pytest.skip("the Llama 2 tokenizer is not in the shared data folder")
        return tok
    return trained_tokenizer(kind)
