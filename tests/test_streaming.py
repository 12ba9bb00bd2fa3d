"""Huge inputs stream: memory does not grow with the input size, and one huge row is counted too
long (or truncated) without being tokenized whole. Peak memory is the real one of a real
`exemplar data` process (its maximum resident set size, measured apart from pytest: see
`run_measured`)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
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


def _config(folder: Path, data: Path, held_out: bool = False, **extra) -> Path:
    """held_out: a tenth held out for evaluation and the rest weighted 1.5, so the prepared set is
    a view through an indices mapping."""
    train: list = [{"path": str(data), "weight": 1.5} if held_out else str(data)]
    held = {"eval_fraction": 0.1} if held_out else {}
    config = {
        "model": {"from_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1}},
        "tokenizer": tokenizer_path(),
        "data": {"train": train, "cache_dir": str(folder / "cache"), "num_proc": 2, **held},
        "max_length": 1024,
        "output_dir": str(folder / "out"),
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Runs argv[2:] and writes its peak RSS (KiB) to the file argv[1]. A process's own ru_maxrss
# starts at its parent's resident size: Linux carries the high-water mark of the image that exec
# replaces (the forked copy of pytest, which earlier tests grow past 2 GiB) into the new
# program's. This small process's children start from its size instead, and RUSAGE_CHILDREN
# gives their peak (the largest one: the command, or one of its workers).
_MEASURE = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(status)
"""


def run_measured(*command: str) -> tuple[int, str, int]:
    """(exit status, output, peak RSS in bytes) of `command`, measured apart from this process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(peak_file), *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return done.returncode, done.stdout, int(peak_file.read_text()) * 1024  # Linux: KiB


def _run_measured(*args: str) -> tuple[int, str, int]:
    """(exit status, output, peak RSS in bytes) of `python -m exemplar ARGS`."""
    return run_measured(sys.executable, "-m", "exemplar", *args)


def test_the_measured_peak_is_the_command_s_own():
    """A grown parent (as pytest is after other tests) does not raise the peak measured for a
    small child: its 600 MiB would show in the child's own ru_maxrss."""
    ballast = bytearray(600 * MIB)
    for page in range(0, len(ballast), 4096):  # resident, not just reserved
        ballast[page] = 1
    status, _, peak = run_measured(sys.executable, "-c", "pass")
    del ballast
    assert status == 0 and peak < 100 * MIB, f"peak RSS {peak / MIB:.0f} MiB"


def _peak(tmp_path: Path, name: str, megabytes: float, command: str, held_out: bool) -> tuple[int, int]:
    folder = tmp_path / name
    folder.mkdir()
    rows = _write_rows(folder / "train.jsonl", megabytes)
    config = _config(folder, folder / "train.jsonl", held_out)
    status, output, peak = _run_measured("data", command, str(config))
    assert status == 0, output
    if command == "validate":
        assert f"{rows} rows in 1 file(s) checked: ok" in output
    else:
        assert f"rows read        {rows}" in output
    return rows, peak


@pytest.mark.parametrize("command, held_out", [("validate", False), ("stats", False), ("stats", True)])
def test_peak_memory_does_not_grow_with_the_input(tmp_path, command, held_out):
    """6 MB and 12 MB of rows (both past the first chunks, which fill the workers' queue):
    before streaming, `stats` held every row and token in memory (about 12 times the input: 70
    MB more for the larger file). Now `validate` is flat; `stats` keeps one length per row, read
    from the small `length` column, also through the indices mapping of `eval_fraction` and a
    weight (which read every token before)."""
    _, small = _peak(tmp_path, "small", 6, command, held_out)
    _, large = _peak(tmp_path, "large", 12, command, held_out)
    growth = large - small
    print(f"{command}: peak RSS {small / MIB:.1f} -> {large / MIB:.1f} MiB")
    assert growth < 1.5 * 6 * MIB, f"peak RSS {small / MIB:.1f} -> {large / MIB:.1f} MiB"


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_a_50_mb_row_is_counted_too_long_without_tokenizing_it(tmp_path, truncation):
    """drop: counted too long untokenized; truncate: only a prefix that surely covers max_length
    tokens is tokenized (see Encoder._bounded)."""
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
    if truncation == "drop":
        assert stats["dropped"] == {"too_long": 1} and stats["train_examples"] == 1
    else:
        assert stats["dropped"] == {} and stats["train_examples"] == 2 and stats["length"]["max"] == 1024
    # Tokenizing it took 7.5 GB; reading, parsing and rendering it needs a few copies of 50 MB.
    print(f"{truncation}: peak RSS {peak / MIB:.0f} MiB")
    assert peak < 1024 * MIB, f"peak RSS {peak / MIB:.0f} MiB"


@functools.cache
def _bounds() -> list:
    """(backend, its TokenLowerBound) per tokenizer, built once: copying the Llama 2 tokenizer and
    scanning its vocabulary per example took minutes over the 450 examples below."""
    found = [trained_tokenizer("bytelevel"), trained_tokenizer("metaspace_first")]
    llama = llama2_tokenizer()
    tokenizers = found + ([llama] if llama is not None else [])
    return [(t.backend_tokenizer, TokenLowerBound(t.backend_tokenizer)) for t in tokenizers]


@pytest.mark.parametrize("index", range(3))
@settings(max_examples=150, deadline=None)
@given(text=st.text(min_size=0, max_size=300))
def test_the_token_bound_never_exceeds_the_real_count(index, text):
    bounds = _bounds()
    if index >= len(bounds):
        pytest.skip("the Llama 2 tokenizer needs the shared data")
    backend, bound = bounds[index]
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
