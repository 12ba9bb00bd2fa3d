"""Huge inputs stream: memory does not grow with the input size, and one huge row is counted too
long without being tokenized. Peak memory is the real one of a real `exemplar data` process
(`os.wait4`'s maximum resident set size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from exemplar.data.length_bound import TokenLowerBound
from exemplar.quickstart import tokenizer_path
from tests.tokenizers_util import llama2_tokenizer, trained_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _write_rows(path: Path, megabytes: float) -> int:
    """Chat rows of about 300 bytes each (varied text, so the tokenizer does real work) up to the size."""
    rows, size = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * MIB:
            words = " ".join(f"word{(rows * 7 + k) % 997}" for k in range(20))
            line = json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {rows}: {words}?"},
                        {"role": "assistant", "content": f"Answer {rows}: {words[::-1]}."},
                    ]
                }
            )
            f.write(line + "\n")
            size += len(line) + 1
            rows += 1
    return rows


def _config(folder: Path, data: Path, **extra) -> Path:
    config = {
        "model": {"from_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1}},
        "tokenizer": tokenizer_path(),
        "data": {"train": [str(data)], "cache_dir": str(folder / "cache"), "num_proc": 2},
        "max_length": 1024,
        "output_dir": str(folder / "out"),
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_measured(*args: str) -> tuple[int, str, int]:
    """(exit status, output, peak RSS in bytes) of `python -m exemplar ARGS`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with subprocess.Popen(
        [sys.executable, "-m", "exemplar", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, output, usage.ru_maxrss * 1024  # Linux reports KiB


def _peak(tmp_path: Path, name: str, megabytes: float, command: str) -> tuple[int, int]:
    folder = tmp_path / name
    folder.mkdir()
    rows = _write_rows(folder / "train.jsonl", megabytes)
    status, output, peak = _run_measured("data", command, str(_config(folder, folder / "train.jsonl")))
    assert status == 0, output
    if command == "validate":
        assert f"{rows} rows in 1 file(s) checked: ok" in output
    else:
        assert f"rows read        {rows}" in output
    return rows, peak


@pytest.mark.parametrize("command", ["validate", "stats"])
def test_peak_memory_does_not_grow_with_the_input(tmp_path, command):
    """6 MB and 12 MB of rows (both past the first chunks, which fill the workers' queue):
    before streaming, `stats` held every row and token in memory (about 12 times the input: 70
    MB more for the larger file). Now `validate` is flat; `stats` keeps one length per row and
    reads the token table's offsets through a memory map (the kernel maps the pages around each
    read, counted as resident though the file backs them): measured 401 -> 408 MiB."""
    _, small = _peak(tmp_path, "small", 6, command)
    _, large = _peak(tmp_path, "large", 12, command)
    growth = large - small
    print(f"{command}: peak RSS {small / MIB:.1f} -> {large / MIB:.1f} MiB")
    assert growth < 1.5 * 6 * MIB, f"peak RSS {small / MIB:.1f} -> {large / MIB:.1f} MiB"


@pytest.mark.parametrize("truncation", ["drop"])
def test_a_50_mb_row_is_counted_too_long_without_tokenizing_it(tmp_path, truncation):
    data = tmp_path / "train.jsonl"
    huge = "lorem ipsum dolor sit amet " * (50 * MIB // 27)
    with data.open("w", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
            )
        )
        f.write("\n")
        f.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": huge}]}
            )
        )
        f.write("\n")
    del huge
    config = _config(tmp_path, data, truncation=truncation)
    status, output, peak = _run_measured("data", "stats", "--json", str(config))
    assert status == 0, output
    stats = json.loads(output[output.index("{") :])
    assert stats["dropped"] == {"too_long": 1} and stats["train_examples"] == 1
    # Tokenizing it took 7.5 GB; reading, parsing and rendering it needs a few copies of 50 MB.
    # Alone this run peaks under 1 GiB, but inside the full suite it was measured at 2.1 GiB
    # (2026-12-02; cause not found yet, see RELIABILITY.md): the bound still fails the old 7.5 GB.
    assert peak < 3 * 1024 * MIB, f"peak RSS {peak / MIB:.0f} MiB"


def _tokenizers():
    found = [trained_tokenizer("bytelevel"), trained_tokenizer("metaspace_first")]
    llama = llama2_tokenizer()
    return found + ([llama] if llama is not None else [])


@pytest.mark.parametrize("index", range(3))
@settings(max_examples=150, deadline=None)
@given(text=st.text(min_size=0, max_size=300))
def test_the_token_bound_never_exceeds_the_real_count(index, text):
    tokenizers = _tokenizers()
    if index >= len(tokenizers):
        pytest.skip("the Llama 2 tokenizer needs the shared data")
    backend = tokenizers[index].backend_tokenizer
    bound = TokenLowerBound(backend)
    assert bound.max_token_bytes is not None  # every one of these can encode any byte
    real = len(backend.encode(text, add_special_tokens=False).ids)
    assert bound.min_tokens([text]) <= real
    assert not bound.exceeds([text], real)


def test_the_bound_is_off_where_text_can_vanish():
    """A WordPiece vocabulary turns any unknown word into one [UNK]: no bound from bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bound = TokenLowerBound(backend)
    assert bound.max_token_bytes is None
    assert bound.min_tokens(["x" * 10_000]) == 0 and not bound.exceeds(["x" * 10_000], 10)
