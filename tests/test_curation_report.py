"""`exemplar data stats` and `exemplar report` on a curation stage: the removal reasons (as
summary.json counts them, checked against removed.jsonl) and a histogram of each meta.scores.NAME,
over a real `exemplar curate filter` stage; the page in headless Chromium; and a training run whose
data is a stage's kept.jsonl shows the same in its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.curate.stats import score_histogram
from exemplar.quickstart import tokenizer_path
from exemplar.train.finetune import finetune
from tests.report_helpers import TINY_LLAMA, Page, chromium_binary, decoded_png_sizes, load_in_chromium

pytestmark = pytest.mark.usefixtures("one_thread")

MARKUP_SCORE = "<i>judge</i>"  # a score name with markup: the page must show it as text
REFUSAL = "I'm sorry, but as an AI language model I cannot help with that."


def input_rows() -> list[dict]:
    """12 reversal rows with a reward of 0.0 .. 1.1 (the three below 0.3 go), a refusal, a placeholder."""
    rows = [(f"Reverse: abc{i}", f"{i}cba", {"reward": i / 10, MARKUP_SCORE: 10 - i % 3}) for i in range(12)]
    rows += [
        ("Reverse: x", REFUSAL, {"reward": 0.9, MARKUP_SCORE: 2}),
        ("Reverse: y", "N/A", {"reward": 0.8}),
    ]
    return [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "meta": {"scores": scores},
        }
        for q, a, scores in rows
    ]


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curation")
    source = root / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in input_rows()))
    out = root / "filtered"
    argv = ["curate", "filter", str(source), "--out", str(out), "--min-score", "reward=0.3"]
    assert main([*argv, "--tokenizer", tokenizer_path(), "--num-proc", "1", "--no-progress"]) == 0
    return out


def copy_of(stage: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stage, tmp_path / "stage"))


def stats_json(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["data", "stats", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_data_stats_prints_the_removal_reasons_and_score_histograms(stage, capsys):
    capsys.readouterr()
    assert main(["data", "stats", str(stage)]) == 0
    text = capsys.readouterr().out
    assert "curation stage   filter" in text and "rows in          14" in text
    lines = text.splitlines()
    reasons = lines[lines.index("removal reasons") + 1 : lines.index("removal reasons") + 4]
    assert [line.split()[:2] for line in reasons] == [
        ["min_score", "3"],
        ["empty_response", "1"],
        ["refusal", "1"],
    ]
    assert "score reward: 14 rows (9 kept, 5 removed)" in text
    assert f"score {MARKUP_SCORE}: 13 rows (9 kept, 4 removed)" in text  # the placeholder row has none
    assert "warning" not in text
    # The stage's kept.jsonl says the same (it names the same folder).
    assert main(["data", "stats", str(stage / "kept.jsonl")]) == 0
    assert capsys.readouterr().out == text


def test_the_histogram_counts_every_score_in_its_bin(stage, capsys):
    stats = stats_json(stage, capsys)
    summary = json.loads((stage / "summary.json").read_text())
    assert stats["removed"] == summary["removed"] and stats["removed_total"] == 5
    assert stats["removed_by"] == {"filter": 5} and stats["problems"] == []
    reward = stats["scores"]["reward"]
    assert (reward["min"], reward["max"], reward["rows"]) == (0.0, 1.1, 14)
    bins = reward["bins"]
    assert len(bins) == 10 and sum(b["kept"] for b in bins) == 9 and sum(b["removed"] for b in bins) == 5
    # the three removed for min_score (0.0, 0.1, 0.2) lie below 0.3; the refusal (0.9), placeholder (0.8) above
    assert sum(b["removed"] for b in bins if b["to"] <= 0.3 + 1e-9) == 3
    assert sum(b["removed"] for b in bins if b["from"] >= 0.77) == 2


def test_a_summary_that_disagrees_with_removed_jsonl_is_reported(stage, tmp_path, capsys):
    folder = copy_of(stage, tmp_path)
    removed = (folder / "removed.jsonl").read_text().splitlines()
    bad = json.loads(removed[0])
    bad["meta"]["scores"]["reward"] = "high"
    (folder / "removed.jsonl").write_text("\n".join([json.dumps(bad), *removed[2:]]) + "\n")
    stats = stats_json(folder, capsys)
    assert any("summary.json counts removals" in p for p in stats["problems"])
    assert any(
        "removed.jsonl, line 1: meta.scores.reward is not a finite number" in p for p in stats["problems"]
    )
    assert main(["data", "stats", str(folder)]) == 0
    assert "warning: summary.json counts removals" in capsys.readouterr().out


def test_an_unfinished_stage_is_a_clear_error(stage, tmp_path, capsys):
    folder = copy_of(stage, tmp_path)
    (folder / "summary.json").unlink()
    assert main(["data", "stats", str(folder)]) == 2
    assert "the stage did not finish there" in capsys.readouterr().err
    assert main(["report", str(folder)]) == 2
    assert "not a training run folder" in capsys.readouterr().err


@given(
    kept=st.lists(st.floats(-1e6, 1e6), max_size=40),
    removed=st.lists(st.floats(-1e6, 1e6), max_size=40),
    bins=st.integers(1, 12),
)
def test_every_score_lands_in_exactly_one_bin_that_holds_it(kept, removed, bins):
    if not kept and not removed:
        return
    result = score_histogram({"kept": kept, "removed": removed}, bins)
    assert sum(b["kept"] for b in result["bins"]) == len(kept)
    assert sum(b["removed"] for b in result["bins"]) == len(removed)
    assert result["bins"][0]["from"] == min(kept + removed)
    assert result["bins"][-1]["to"] == pytest.approx(max(kept + removed), abs=1e-6)
    for lower, upper in zip(result["bins"], result["bins"][1:], strict=False):
        assert lower["to"] == pytest.approx(upper["from"])


def test_report_on_a_stage_folder_draws_reasons_and_histograms(stage, tmp_path, capsys):
    folder = copy_of(stage, tmp_path)
    assert main(["report", str(folder)]) == 0
    html = (folder / "report.html").read_text()
    page = Page(html)
    assert list(page.sections) == ["curation", "versions"] and page.scripts == 0
    sizes = decoded_png_sizes(page.images)  # the reasons chart and one histogram per score
    assert len(sizes) == 3 and all(w > 100 and h > 100 for w, h in sizes)
    text = page.text("curation")
    for needle in ("min_score", "empty_response", "refusal", "meta.scores.reward14"):
        assert needle in text
    assert "<i>" not in html and "&lt;i&gt;judge&lt;/i&gt;" in html


def test_the_stage_report_loads_in_chromium(stage, tmp_path):
    chromium = chromium_binary()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    folder = copy_of(stage, tmp_path)
    assert main(["report", str(folder)]) == 0
    probe, dom, shot = load_in_chromium(chromium, folder / "report.html", tmp_path)
    assert probe["errors"] == [] and probe["alerts"] == []
    assert len(probe["images"]) == 3
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in probe["images"]), probe["images"]
    assert dom.count("<script") == 1 and shot.stat().st_size > 20_000  # only the probe's own script


def test_a_run_trained_on_a_stage_shows_its_curation(stage, tmp_path):
    config = load_config(
        None,
        model={"from_config": TINY_LLAMA},
        tokenizer=tokenizer_path(),
        data={"train": [{"path": str(stage / "kept.jsonl")}], "cache_dir": str(tmp_path / "cache")},
        max_length=64,
        train={"micro_batch_size": 4, "max_steps": 2, "lr": 1e-3},
        output_dir=str(tmp_path / "out"),
    )
    finetune(config, progress=False)
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    (curation,) = stats["curation"]
    assert curation["folder"] == str(stage) and curation["removed"]["min_score"] == 3
    page = Page((tmp_path / "out" / "report.html").read_text())
    text = page.text("data")
    assert "Curation: filter stage in" in text and "empty_response" in text
    assert len(decoded_png_sizes(page.images)) == 4 + 1 + 3  # curves, length histogram, curation
