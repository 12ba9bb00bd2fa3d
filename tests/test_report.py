"""`exemplar report RUN_DIR` and the report `exemplar train` writes at the end of every run: every
section present, charts that decode, data text shown as text, missing parts said to be missing,
a clear error for a folder that is not a run, and a failed report never costs the trained model."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from exemplar.cli import main
from exemplar.config import load_config
from exemplar.data.inspect import compute_stats
from exemplar.report import build_report, write_report
from exemplar.report.run_record import write_config
from tests.report_helpers import (
    SCRIPT_ROW,
    Page,
    chromium_binary,
    decoded_png_sizes,
    load_in_chromium,
    run_config,
    train_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SECTIONS = ["summary", "training", "data", "mask-preview", "evaluation", "config", "versions"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (4 steps, eval every 2) shared by the tests that only read its folder."""
    folder = tmp_path_factory.mktemp("run")
    summary = train_tiny(folder)
    return folder, summary


def test_training_writes_the_report_and_lists_it_in_the_outputs(trained):
    folder, summary = trained
    out = folder / "out"
    assert summary["outputs"]["report"] == str(out / "report.html")
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["outputs"]["report"] == str(out / "report.html")
    assert {"python", "torch", "transformers", "peft", "datasets", "exemplar", "platform", "cuda"} <= set(
        saved["versions"]
    )
    page = Page((out / "report.html").read_text())
    assert list(page.sections) == SECTIONS
    # loss (train and eval), learning rate, grad norm, tokens/s, token-length histogram
    sizes = decoded_png_sizes(page.images)
    assert len(sizes) == 5 and all(w > 100 and h > 100 for w, h in sizes)
    assert "No evaluation" in page.text("evaluation")


def test_the_page_is_self_contained_and_runs_no_script(trained):
    html = (trained[0] / "out" / "report.html").read_text()
    page = Page(html)
    assert page.scripts == 0
    for needle in ("http://", "https://", "<link", "@import", "url("):
        assert needle not in html
    assert all(src.startswith("data:image/png;base64,") for src in page.images)


def test_data_text_with_markup_is_shown_as_text(trained):
    html = (trained[0] / "out" / "report.html").read_text()
    page = Page(html)
    assert page.scripts == 0 and "<script>" not in html
    assert "Reverse: " + SCRIPT_ROW in page.text("mask-preview")  # the first example, escaped


def test_data_statistics_match_exemplar_data_stats(trained):
    folder, _ = trained
    stats = json.loads((folder / "out" / "data_stats.json").read_text())
    expected = compute_stats(load_config(None, **run_config(folder)), progress=False)
    for key in ("train_examples", "eval_examples", "tokens", "trained_tokens", "trained_share"):
        assert stats[key] == pytest.approx(expected[key])
    assert sum(b["count"] for b in stats["length_histogram"]) == stats["train_examples"]
    assert stats["length"]["max"] == expected["length"]["max"]
    assert stats["dropped"] == expected["dropped"] and sum(stats["dropped"].values()) == 1
    first = stats["previews"][0]
    assert len(first["tokens"]) == len(first["trained"]) == first["length"]
    assert sum(first["trained"]) == first["trained_tokens"] > 0
    text = Page((folder / "out" / "report.html").read_text()).text("data")
    (reason,) = stats["dropped"]
    assert f"{stats['trained_share']:.1%}" in text and reason in text


def test_the_config_of_the_run_is_recorded_and_shown(trained):
    folder, _ = trained
    written = yaml.safe_load((folder / "out" / "config.yaml").read_text())
    assert written == load_config(None, **run_config(folder)).model_dump(mode="json")
    config_text = Page((folder / "out" / "report.html").read_text()).text("config")
    assert "micro_batch_size: 4" in config_text and "eval_every: 2" in config_text


def test_report_command_shows_the_eval_table(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0] / "out", run)
    models = {
        "base": {
            "nll": 2.5,
            "perplexity": 12.18,
            "token_accuracy": 0.31,
            "exact_match": 0.0,
            "stop_rate": 0.1,
        },
        "tuned <b>": {
            "nll": 0.71,
            "perplexity": 2.03,
            "exact_match": 0.75,
            "mean_length": 6.5,
            "general_nll": 3.1,
        },
    }
    (run / "eval").mkdir()
    intervals = {"tuned <b>": {"exact_match": [0.5, 0.9]}}
    (run / "eval" / "eval.json").write_text(
        json.dumps({"models": models, "intervals": intervals, "confidence": 0.95})
    )
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = Page((run / "report.html").read_text())
    text = page.text("evaluation")
    for name in (
        "nll",
        "perplexity",
        "token_accuracy",
        "exact_match",
        "stop_rate",
        "mean_length",
        "general_nll",
    ):
        assert name in text
    assert "tuned <b>" in text and "12.18" in text and "–" in text  # a dash: a missing value
    assert "0.75 [0.5, 0.9]" in text and "95% bootstrap interval" in text


def test_a_run_folder_without_the_optional_parts_still_renders(tmp_path):
    """A run stopped early: a few metrics rows (the last one cut short by a kill), nothing else."""
    rows = [
        {"step": s, "epoch": s / 4, "loss": 3.0 - s / 10, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_s": 900.0}
        for s in range(1, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    page = Page(build_report(tmp_path))
    assert list(page.sections) == SECTIONS
    assert "the run has not finished" in page.text("summary")
    assert "No data_stats.json" in page.text("data")
    assert "No mask preview" in page.text("mask-preview")
    assert "No evaluation" in page.text("evaluation")
    assert "No config.yaml" in page.text("config")
    assert "recorded no versions" in page.text("versions") and "python" in page.text("versions")
    assert len(decoded_png_sizes(page.images)) == 4  # loss, lr, grad norm, tokens/s
    html = build_report(tmp_path)
    assert "1 line(s) of metrics.jsonl are not metrics rows" in html


def test_an_eval_file_without_a_models_table_or_unreadable_is_said_to_be(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.001}\n')
    (tmp_path / "eval.json").write_text('{"results": []}')
    out = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and not (tmp_path / "report.html").exists()
    assert "eval.json holds no `models` table" in Page(out.read_text()).text("evaluation")
    (tmp_path / "eval.json").write_text('{"models": ')  # cut short
    html = build_report(tmp_path)
    assert "eval.json could not be read" in html and "No evaluation" in Page(html).text("evaluation")


@pytest.mark.parametrize("make", ["empty", "missing", "a file"])
def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys, make):
    target = tmp_path / "folder"
    if make == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif make == "a file":
        target.write_text("not a folder")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "Traceback" not in err
    assert ("not a training run folder" in err) if make == "empty" else ("no such folder" in err)
    assert not (target / "report.html").exists() if target.is_dir() else True


def test_a_failed_report_is_a_warning_and_the_model_is_kept(tmp_path, caplog):
    # A folder where the page should go: writing report.html fails, as a full disk would.
    (tmp_path / "out" / "report.html").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="exemplar"):
        summary = train_tiny(tmp_path, max_steps=2, eval_every=None)
    assert "the training report could not be written" in caplog.text
    assert "report" not in summary["outputs"]
    saved = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert saved["outputs"] == {"model": str(tmp_path / "out" / "model")}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(summary["outputs"]["model"]) is not None
    # and the same folder reports once the obstacle is gone
    (tmp_path / "out" / "report.html").rmdir()
    assert write_report(tmp_path / "out").is_file()


def test_a_users_own_config_yaml_in_the_output_folder_is_never_overwritten(tmp_path):
    config = load_config(None, tokenizer="t", output_dir=str(tmp_path))
    assert write_config(config, tmp_path) == tmp_path / "config.yaml"  # ours: written ...
    config.max_length = 128
    write_config(config, tmp_path)  # ... and replaced by the next run
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["max_length"] == 128
    (tmp_path / "config.yaml").write_text("# my notes\nmax_length: 7\n")
    assert write_config(config, tmp_path) is None
    assert (tmp_path / "config.yaml").read_text() == "# my notes\nmax_length: 7\n"


# ---------------------------------------------------------------------------------------------
# In a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it)


@pytest.fixture(scope="module")
def chromium():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return binary


def test_the_report_loads_in_chromium_every_image_decodes_and_no_script_runs(trained, chromium, tmp_path):
    probe, dom, shot = load_in_chromium(chromium, trained[0] / "out" / "report.html", tmp_path)
    assert probe["errors"] == [] and probe["alerts"] == []
    assert len(probe["images"]) == 5
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in probe["images"]), probe["images"]
    assert dom.count("<script") == 1  # the probe's own: the data's <script> row stayed text
    assert SCRIPT_ROW.replace("<", "&lt;").replace(">", "&gt;") in dom
    from PIL import Image

    image = Image.open(shot)
    assert image.size == (1100, 6000) and shot.stat().st_size > 50_000
    assert len(image.convert("L").getcolors(maxcolors=1 << 16) or []) > 20  # drawn, not a blank page


def test_the_chromium_probe_catches_a_broken_image_and_a_script_error(chromium, tmp_path):
    """The check above can fail: a page with an undecodable image and a failing script is caught."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        '<img alt="bad" src="data:image/png;base64,AAAA"><script>notDefined(); </script>'
        "<script>alert(1)</script></body></html>"
    )
    probe, _, _ = load_in_chromium(chromium, broken, tmp_path)
    assert probe["images"] == [{"alt": "bad", "complete": True, "naturalWidth": 0}]
    assert any("notDefined" in e for e in probe["errors"]) and "image failed: bad" in probe["errors"]
    assert probe["alerts"] == ["1"]
