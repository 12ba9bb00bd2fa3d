"""bench/minhash.py's made rows and its scoring, at a tiny size: the ground truth is what the
rows are, and exemplar's dedup scored against it finds every exact copy and removes no original."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # bench/minhash.py imports its sibling minhash_data.py
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytest.importorskip("datasketch")
data = _load("minhash_data")
if not (data.SHARED / "alpaca_en_demo.json").is_file():
    pytest.skip(f"reference data not at {data.SHARED} (set EXEMPLAR_SHARED_DATA)", allow_module_level=True)
minhash = _load("minhash")


@pytest.fixture(scope="module")
def made():
    return data.make_rows(400, seed=5, exact_share=0.1, near_share=0.1)


def test_the_truth_describes_the_rows(made):
    rows, truth = made
    texts = [data.compared(r) for r in rows]
    assert len(rows) == 400 and list(np.bincount(truth.kind)) == [320, 40, 40]
    originals = {data.normalise(t) for t, k in zip(texts, truth.kind, strict=True) if k == data.ORIGINAL}
    assert len(originals) == 320  # distinct after normalisation
    for i in np.flatnonzero(truth.kind != data.ORIGINAL):
        o = truth.copy_of[i]
        assert o < i and truth.kind[o] == data.ORIGINAL  # each copy after its original
        if truth.kind[i] == data.EXACT:
            assert rows[i] == rows[o]
        else:
            assert rows[i] != rows[o]
            assert truth.jaccard[i] == pytest.approx(data.true_jaccard(texts[i], texts[o]))
    assert (truth.jaccard[truth.kind == data.NEAR] < 1).any()  # some edits change the shingles


def test_exemplar_dedup_scored_against_the_truth(made, tmp_path):
    rows, truth = made
    path = tmp_path / "rows.jsonl"
    data.write_jsonl(rows, path)
    minhash.run_exemplar(path, tmp_path / "out", 0.8, 1)
    removed = minhash.removed_rows(tmp_path / "out", "exemplar")
    score = minhash.score(removed, truth, [data.compared(r) for r in rows], 0.8)
    assert score["recall_exact"] == 1.0
    assert score["originals_removed"] == 0 and score["precision"] == 1.0
    assert score["duplicate_of_right_cluster"] == 1.0
    assert score["recall_near_at_threshold"] > 0.8
