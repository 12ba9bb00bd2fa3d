"""bench/curation.py's data and curation at a tiny size (no training): every kind of noise is in
the noisy set, and `curate filter` + `curate dedup` remove exactly the noise and no clean row."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # bench/curation.py imports its sibling curation_data.py
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytest.importorskip("datasketch")
curation = _load("curation")
data = _load("curation_data")
SIZES = data.NoiseSizes(clean=80, wrong=24, refusal=12, repetition=12, duplicated_rows=3, copies=6)


@pytest.fixture(scope="module")
def noisy():
    return data.make_noisy_set(SIZES, seed=3, n_heldout=20)


def test_every_noise_kind_is_present_and_the_verifier_tells_right_from_wrong(noisy):
    rows, heldout = noisy
    kinds = Counter(r["meta"]["noise"] for r in rows)
    assert kinds == {
        "clean": SIZES.clean,
        "wrong": SIZES.wrong,
        "refusal": SIZES.refusal,
        "repetition": SIZES.repetition,
        "duplicate": SIZES.duplicated_rows * SIZES.copies,
    }
    assert len(rows) == SIZES.total()
    for row in rows:
        assert data.reversal_verified(row) == (row["meta"]["noise"] in ("clean", "duplicate")), row
    assert all(data.reversal_verified(r) for r in heldout)
    # Copies come after the clean row they copy, and differ from it at most in whitespace.
    seen = {}
    for row in rows:
        key = " ".join(row["messages"][0]["content"].split())
        if row["meta"]["noise"] == "duplicate":
            assert seen[key]["meta"]["noise"] == "clean"
            assert seen[key]["messages"][1] == row["messages"][1]
        seen.setdefault(key, row)

    # No held-out letter list is in training.
    def lists(rs):
        return {" ".join(sorted(r["messages"][1]["content"].split())) for r in rs}

    clean = [r for r in rows if r["meta"]["noise"] == "clean"]
    assert not lists(heldout) & lists(clean)


def test_curation_removes_the_noise_and_keeps_every_clean_row(noisy, tmp_path):
    rows, _ = noisy
    path = curation.write_jsonl(rows, tmp_path / "noisy.jsonl")
    kept, summaries = curation.curate(path, tmp_path / "curate")
    assert curation.noise_counts(kept) == {"clean": SIZES.clean}
    scored, filtered, deduped = summaries
    assert scored["kept"] == len(rows)  # scoring removes nothing: every row has a verdict
    assert filtered["removed"] == {
        "min_score": SIZES.wrong,
        "refusal": SIZES.refusal,
        "repetition": SIZES.repetition,
    }
    assert sum(deduped["removed"].values()) == SIZES.duplicated_rows * SIZES.copies
    assert deduped["clusters"]["count"] == SIZES.duplicated_rows
    # Each removed row says why; every kept row still names its line of the noisy file.
    removed = [json.loads(line) for line in (tmp_path / "curate" / "filter" / "removed.jsonl").open()]
    assert {r["meta"]["noise"] for r in removed if r["meta"]["reason"] == "min_score"} == {"wrong"}
    lines = [json.loads(line)["meta"]["source"]["row"] for line in kept.open()]
    assert lines == sorted(lines) and len(set(lines)) == SIZES.clean
