"""The end-of-training report: `exemplar report RUN_DIR` writes RUN_DIR/report.html.

One self-contained HTML page (charts inline) with the loss curve (train and eval), learning
rate, gradient norm, tokens per second, the data statistics (token-length histogram, trained
share, drops by reason), a mask preview of a few examples, the run's evaluation table (when an
`exemplar eval` result is in the folder), the config and the versions. `exemplar train` writes it
at the end of every run; it can be made again at any time from the folder alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from exemplar.fsio import atomic_write_text
from exemplar.report.run_folder import REPORT_FILE, NotARunFolder, RunFolder, read_run_folder

__all__ = ["REPORT_FILE", "NotARunFolder", "RunFolder", "build_report", "read_run_folder", "write_report"]

log = logging.getLogger(__name__)


def build_report(run_dir: str | Path) -> str:
    """The report page of the run in `run_dir` (or of the curation stage folder), as HTML text."""
    from exemplar.curate.stats import curation_stats, stage_folder
    from exemplar.report.curation_page import render_curation
    from exemplar.report.page import render
    from exemplar.report.run_record import versions

    try:
        run = read_run_folder(run_dir)
    except NotARunFolder:
        if stage_folder(run_dir) is None:
            raise
        return render_curation(curation_stats(run_dir), versions())
    return render(run, versions())


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html, atomically) and return its path."""
    html = build_report(run_dir)
    return atomic_write_text(Path(out) if out is not None else Path(run_dir) / REPORT_FILE, html)


def record_run_data(config, prepared) -> None:
    """At the end of `exemplar train` (rank 0): OUTPUT/config.yaml and OUTPUT/data_stats.json, what
    the report shows of the config and the data. A failure here is a warning: it costs the report
    those sections, never the training run."""
    from exemplar.report.run_record import write_config, write_data_stats

    try:
        write_config(config, config.output_dir)
        write_data_stats(prepared, config.max_length, config.output_dir, _curation_of(config))
    except Exception as e:  # noqa: BLE001 - any failure: the run goes on without these files
        log.warning("could not record the config and data statistics for the report: %s", e)


def _curation_of(config) -> list[dict]:
    """The statistics of each curation stage whose kept.jsonl (or folder) is a training dataset."""
    from exemplar.curate.stats import curation_stats, stage_folder

    paths = [config.resolve_path(spec.path) for spec in config.data.train]
    return [curation_stats(path) for path in paths if stage_folder(path) is not None]


def report_after_training(run_dir: str | Path) -> Path | None:
    """The report at the end of `exemplar train`: its path, or None (and a warning) when it could not
    be written, because the trained model matters more than its report."""
    try:
        path = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - any failure: the model is saved, the report is not
        log.warning("the training report could not be written (`exemplar report %s` retries): %s", run_dir, e)
        return None
    log.info("report: %s", path)
    return path
