"""`exemplar curate run CONFIG`: the config's `curate.stages`, in order, each in its own folder.

Stage K writes `curate.out/KK-NAME` (01-filter, 02-dedup, ...) in the layout of curate/io.py;
the first reads the command's files or the config's `data.train`, each other one the kept.jsonl
of the stage before it. A stage is run again only when it has to be: its folder's summary.json
(written last, so a crashed stage has none) must hold the same options and the same input
identity, or the stage runs. The input identity is the SHA-256 of the files read (the first
stage: the content of each dataset file or folder, with its dataset options; the others: the
kept.jsonl before them). So a crash resumes at the first unfinished stage; a changed option
reruns that stage and, as their input then changes, those after it; an unchanged rerun runs
nothing. What the identity does not see: the code of a verifier or the files of a model named
by path; `--from K` reruns from stage K. A Hub dataset is identified by its name and options.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from exemplar.config import Config, CurateStage, DatasetSpec
from exemplar.curate.io import KEPT, SUMMARY, Record, StageWriter, read_inputs
from exemplar.errors import ConfigError, ExemplarError
from exemplar.train.run_guard import output_dir_lock

Log = Callable[[str], None]
Reader = Callable[[], Iterable[Record]]


def run(
    config: Config,
    inputs: list[str],
    workers: int = 1,
    progress: bool = True,
    rerun_from: int | None = None,
    log: Log = print,
) -> Path:
    """Run or resume the stages; the final stage's kept.jsonl."""
    stages = config.curate.stages
    if not stages:
        raise ConfigError("curate.stages is empty: list the stages, e.g. [{filter: {}}, {dedup: {}}]")
    if rerun_from is not None and not 1 <= rerun_from <= len(stages):
        raise ConfigError(f"--from {rerun_from}: the stages are numbered 1 to {len(stages)}")
    out = Path(config.resolve_path(config.curate.out))
    identity = first_input_identity(inputs, config)
    read: Reader = lambda: read_inputs(inputs, config)  # noqa: E731
    with output_dir_lock(out):
        for number, stage in enumerate(stages, 1):
            name, _ = stage.kind()
            folder = out / f"{number:02d}-{name}"
            options = stage_options(stage, config)
            forced = rerun_from is not None and number >= rerun_from
            why = None if forced else _unchanged(folder, name, options, identity)
            if why is None:
                log(f"{folder.name}: running")
                with StageWriter(folder, name, options) as writer:
                    writer.extra["input"] = identity
                    STAGES[name](stage, config, read, writer, workers, progress, log)
                summary = writer.summary()
            else:
                summary = why
            _say(folder, summary, why is not None, log)
            identity = {"sha256": file_sha256(folder / KEPT)}
            read = _kept_reader(folder)
        _note_stale(out, len(stages), log)
    return folder / KEPT


def _unchanged(folder: Path, name: str, options: dict, identity: dict) -> dict | None:
    """The folder's summary when it is this stage finished on this input with these options."""
    import json

    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (
        summary.get("stage") == name
        and summary.get("options") == options
        and summary.get("input") == identity
        and (folder / KEPT).is_file()
    )
    return summary if same else None


def _say(folder: Path, summary: dict, skipped: bool, log: Log) -> None:
    removed = ", ".join(f"{k} {v}" for k, v in summary["removed"].items()) or "none"
    state = "unchanged, not run again" if skipped else "done"
    log(f"{folder.name}: {state}: {summary['in']} in, {summary['kept']} kept, removed: {removed}")


def _kept_reader(folder: Path) -> Reader:
    def read() -> Iterator[Record]:
        path = folder / KEPT
        if path.stat().st_size:  # an empty file has no format to detect: no rows
            yield from read_inputs([str(path)])

    return read


def _note_stale(out: Path, count: int, log: Log) -> None:
    stale = sorted(p.name for p in out.glob("[0-9][0-9]-*") if p.is_dir() and int(p.name[:2]) > count)
    if stale:
        log(f"note: {', '.join(stale)} in {out} are not stages of this config (left as they are)")


# ---------------------------------------------------------------------------------------------
# What identifies a stage's work: its options and its input


def stage_options(stage: CurateStage, config: Config) -> dict[str, Any]:
    """The options a stage's result depends on, as stored in its summary.json."""
    name, options = stage.kind()
    stored = options.model_dump(mode="json")
    if name == "filter":
        stored["rules"] = filter_rules(stage, config).model_dump(mode="json")
        stored["tokenizer"] = _tokenizer(stage, config)
        stored["max_length"] = config.max_length  # the default max_tokens
    return stored


def first_input_identity(inputs: list[str], config: Config) -> dict[str, Any]:
    specs = [DatasetSpec(path=p) for p in inputs] if inputs else config.data.train
    if not specs:
        raise ConfigError("no input: give files after the config, or datasets under data.train")
    datasets = []
    for spec in specs:
        path = Path(config.resolve_path(spec.path) if not inputs else spec.path)
        local = path.exists()
        datasets.append({**spec.model_dump(mode="json"), "sha256": tree_sha256(path) if local else None})
    return {"datasets": datasets}


def tree_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (their relative paths and contents)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The stages


def filter_rules(stage: CurateStage, config: Config):
    """curate.filter with the keys the stage's `rules` gives replaced."""
    rules = stage.filter.rules
    if rules is None:
        return config.curate.filter
    return config.curate.filter.model_copy(update=rules.model_dump(include=rules.model_fields_set))


def _tokenizer(stage: CurateStage, config: Config) -> str | None:
    if stage.filter.tokenizer:
        return config.resolve_path(stage.filter.tokenizer)
    try:
        return config.tokenizer_source()
    except ConfigError:
        return None


def _filter(stage, config, read, writer, workers, progress, log) -> None:
    from exemplar.curate.filters import filter_records

    tokenizer = _tokenizer(stage, config)
    if tokenizer is None:
        log("note: no tokenizer (the stage's tokenizer, or the config's): token length rules skipped")
    curate = config.curate.model_copy(update={"filter": filter_rules(stage, config)})
    staged = config.model_copy(update={"curate": curate})
    filter_records(read(), writer, staged, stage.filter.min_scores, tokenizer, workers, progress)


def _dedup(stage, config, read, writer, workers, progress, log) -> None:
    from exemplar.curate.dedup import dedup

    o = stage.dedup
    model = config.resolve_path(o.model) if o.model else None
    dedup(read(), writer, o.method, o.threshold, o.on, workers, model, progress, log)


def _score(stage, config, read, writer, workers, progress, log) -> None:
    try:
        from exemplar.curate.scorers import make_scorer, score_records
    except ImportError as e:
        raise ExemplarError(
            f"the score stage needs exemplar.curate.scorers, not in this install ({e})"
        ) from None

    scorers = [make_scorer(spec, config) for spec in stage.score.scorers]
    score_records(read(), writer, scorers, batch_size=stage.score.batch_size, progress=progress)


def _select(stage, config, read, writer, workers, progress, log) -> None:
    from exemplar.curate.select import select

    options = stage.select
    if options.model:
        options = options.model_copy(update={"model": config.resolve_path(options.model)})
    select(read, writer, options, progress, log)


STAGES = {"filter": _filter, "dedup": _dedup, "score": _score, "select": _select}
