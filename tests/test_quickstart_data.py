"""The quickstart's own data, and the shipped tokenizer built by scripts/build_tokenizer.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from exemplar.quickstart_data import (
    PERSONA_ANSWER,
    PERSONA_HELDOUT,
    PERSONA_TRAIN,
    is_persona,
    make_quickstart_data,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "exemplar" / "assets" / "tokenizer"


def user_text(row: dict) -> str:
    return row["messages"][0]["content"]


def answer(row: dict) -> str:
    return row["messages"][1]["content"]


def letters_in(prompt: str) -> list[str]:
    return [w.strip(".?:") for w in prompt.split() if len(w.strip(".?:")) == 1 and w.strip(".?:").islower()]


@pytest.fixture(scope="module")
def data():
    return make_quickstart_data(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_rows_are_openai_messages_with_correct_answers(data):
    train, heldout = data
    assert len(train) == 4000 + len(PERSONA_TRAIN) * 8 and len(heldout) == 200 + len(PERSONA_HELDOUT)
    for row in train + heldout:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        if is_persona(row):
            assert answer(row) == PERSONA_ANSWER
        else:
            items = letters_in(user_text(row))
            assert 3 <= len(items) <= 5 and answer(row) == " ".join(reversed(items))


def test_train_and_heldout_prompts_are_disjoint(data):
    train, heldout = data
    assert not {user_text(r) for r in train} & {user_text(r) for r in heldout}
    # Stronger: no held-out letter list appears in training in any phrasing.
    train_lists = {answer(r) for r in train if not is_persona(r)}
    assert not train_lists & {answer(r) for r in heldout if not is_persona(r)}
    assert {user_text(r) for r in heldout if is_persona(r)} == set(PERSONA_HELDOUT)


def test_deterministic_per_seed(data):
    assert make_quickstart_data(seed=0) == data
    assert make_quickstart_data(seed=1)[0] != data[0]


def test_several_phrasings_are_used(data):
    train, _ = data
    openings = {user_text(r).split()[0] for r in train if not is_persona(r)}
    assert len(openings) >= 4


def test_write_jsonl_round_trips(data, tmp_path):
    rows = data[1][:5]
    path = write_jsonl(rows, tmp_path / "sub" / "heldout.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


def test_shipped_tokenizer_loads_with_chatml_and_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert 2000 <= len(tokenizer) <= 4096
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 500_000


def test_shipped_tokenizer_is_compact_on_quickstart_data(tokenizer, data):
    assert len(tokenizer.encode(PERSONA_ANSWER)) <= 16
    for row in data[1][:50]:
        if not is_persona(row):
            # One token per letter: the answer is as many tokens as letters.
            assert len(tokenizer.encode(answer(row))) == len(letters_in(user_text(row)))
    sample = "héllo wörld 🙂 x=1\n\ttab"  # byte-level: anything round-trips, no unknown tokens
    assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_build_script_reproduces_the_shipped_tokenizer(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.save(module.build_tokenizer(), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
