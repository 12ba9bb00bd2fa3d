"""From the config's datasets to training rows: convert, render, mask, tokenize, cache, report.

Each dataset is encoded on its own and cached on disk under a fingerprint of its files'
contents, the tokenizer, the template and every option that changes the result, so a second or
resumed run loads Arrow files instead of tokenizing again, and any changed option misses the
cache. Nothing is dropped silently: every dropped row is counted by reason in the report.

Two kinds of dataset are never cached, because nothing cheap and reliable identifies their
result: data given in memory (no file bytes to hash; a generator can be read only once, and a
`datasets.Dataset` has no public content fingerprint), and files read through a format
registered with `exemplar.register_format` (its converter is arbitrary code, closures included).
Write such rows to a file (`exemplar data convert`) to have them cached.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from exemplar.config import Config, DatasetSpec, load_config
from exemplar.data.encode import Encoder
from exemplar.data.formats import CONVERTERS, convert_rows, describe_format, format_decisions
from exemplar.data.masking import ChatMasker
from exemplar.data.registry import UserFormat, install, user_formats
from exemplar.data.schema import Conversation, SourceRow
from exemplar.data.sources import Source, sources, train_sources
from exemplar.data.tokenizer import TokenizerBundle, load_tokenizer
from exemplar.data.turns import every_turn
from exemplar.errors import DataError, RowError
from exemplar.fsio import atomic_write_json, disk_full_guard

log = logging.getLogger(__name__)

# Bump when the encoding logic changes, so caches written by older code are not reused.
PIPELINE_VERSION = "4"  # 3: reasoning/preference formats, every_turn; 4: masks of tool calls and reasoning (issue 9)
# Below this many rows a single process is faster than starting workers.
_PARALLEL_MIN_ROWS = 4096


@dataclass
class SourceReport:
    path: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    turns_without_stop: int = 0
    # Message fields the chat template did not render, by field (masking.RenderedChat.dropped_fields).
    dropped_fields: dict[str, int] = field(default_factory=dict)
    template_errors: list[str] = field(default_factory=list)  # the first few, with row locations
    invalid: int = 0  # rows skipped as invalid (data.skip_invalid)
    invalid_examples: list[str] = field(default_factory=list)  # the first few problems
    cached: bool = False
    formats: dict[str, str] = field(default_factory=dict)  # file -> the format it was read as
    # mask.reasoning: every_turn: the examples made, and from how many conversations
    turn_examples: int = 0
    turn_conversations: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.rows} rows, {self.kept} kept" + (" (cached)" if self.cached else "")]
        for file, fmt in sorted(self.formats.items()):
            label = "format" if len(self.formats) == 1 else f"format of {file}"
            out.append(f"  {label}: {describe_format(fmt)}")
        if self.turn_conversations:
            out.append(
                f"  mask.reasoning every_turn: {self.turn_examples} examples "
                f"from {self.turn_conversations} conversations"
            )
        for reason, count in sorted(self.dropped.items()):
            out.append(f"  dropped {count} ({reason})")
        if self.turns_without_stop:
            out.append(f"  warning: {self.turns_without_stop} trained turns have no stop token after them")
        for name, count in sorted(self.dropped_fields.items()):
            out.append(
                f"  warning: the chat template does not render {name} of {count} messages (not trained)"
            )
        out += [f"  {msg}" for msg in self.template_errors]
        if self.invalid:
            out.append(f"  skipped {self.invalid} invalid rows (data.skip_invalid), e.g.:")
            out += [f"    {msg}" for msg in self.invalid_examples]
        return out


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    bundle: TokenizerBundle
    masker: ChatMasker
    reports: list[SourceReport]

    @property
    def tokenizer(self) -> Any:
        return self.bundle.tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a reply: the template's end-of-turn token and the tokenizer's EOS."""
        tok = self.bundle.tokenizer
        ids = []
        if self.masker.stop_token:
            ids.append(tok.convert_tokens_to_ids(self.masker.stop_token))
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        return list(dict.fromkeys(ids))


def build_masker(config: Config, bundle: TokenizerBundle) -> ChatMasker:
    masker = ChatMasker(
        bundle.template, bundle.variables, bundle.special_tokens, config.mask, config.data.template_date
    )
    if masker.stop_token is None and config.mask.train_stop_token:
        log.warning(
            "the chat template closes assistant turns with no stop token: a model trained on it "
            "will not learn to stop. Use a template that ends turns with a special token."
        )
    return masker


def build_encoder(config: Config, bundle: TokenizerBundle, masker: ChatMasker) -> Encoder:
    return Encoder(bundle.tokenizer, masker, config.max_length, config.truncation)


def prepare_data(
    config: Config | str | Path | dict[str, Any],
    bundle: TokenizerBundle | None = None,
    use_cache: bool = True,
    progress: bool = True,
    *,
    train_data: Any = None,
    eval_data: Any = None,
    data_format: str | None = None,
    tokenizer: Any = None,
) -> PreparedData:
    """Encode every train and eval dataset, apply weights and the held-out fraction.

    `config` is a `Config`, or a YAML path or mapping for `load_config`. `train_data` /
    `eval_data` (rows in memory: row dicts of any format, a `datasets.Dataset`, or conversations)
    replace the config's `data.train` / `data.eval`; `data_format` names their format (detected
    from the first row when omitted). The config's other data options apply to them as to files
    (eval_fraction, num_proc). `tokenizer`: an already loaded fast tokenizer to use instead of
    the config's (it gets the config's chat template and special tokens).
    """
    from datasets import concatenate_datasets

    if not isinstance(config, Config):
        config = load_config(config)
    bundle = bundle or load_tokenizer(config, tokenizer)
    masker = build_masker(config, bundle)
    encoder = build_encoder(config, bundle, masker)
    reports, train_parts, eval_parts = [], [], []
    eval_sources = sources(config, "eval", eval_data, data_format)
    held_out = not eval_sources and eval_data is None and config.data.eval_fraction > 0
    for source in train_sources(config, train_data, data_format):
        ds, report = encode_source(source, config, bundle, encoder, use_cache, progress)
        reports.append(report)
        if held_out and len(ds) > 1:
            split = ds.train_test_split(
                test_size=config.data.eval_fraction, seed=config.train.seed, shuffle=True
            )
            ds = split["train"]
            eval_parts.append(split["test"])
        train_parts.append(_apply_weight(ds, source.spec.weight, config.train.seed))
    for source in eval_sources:
        ds, report = encode_source(source, config, bundle, encoder, use_cache, progress)
        reports.append(report)
        eval_parts.append(ds)
    train = concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
    if len(train) == 0:
        raise DataError("no training examples left after preprocessing:\n" + _report_text(reports))
    evaluation = None
    if eval_parts:
        evaluation = concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]
    return PreparedData(train, evaluation, bundle, masker, reports)


def _apply_weight(ds: Any, weight: float, seed: int) -> Any:
    """Weight w: each example floor(w) times, plus a seeded random fraction w - floor(w) of them."""
    if weight == 1.0:
        return ds
    import random

    whole, frac = int(weight), weight - int(weight)
    indices = [i for _ in range(whole) for i in range(len(ds))]
    extra = sorted(random.Random(seed).sample(range(len(ds)), round(frac * len(ds))))
    return ds.select(indices + extra)


def _report_text(reports: list[SourceReport]) -> str:
    return "\n".join(line for r in reports for line in r.lines())


# ---------------------------------------------------------------------------------------------
# One dataset


def encode_source(
    source: Source | DatasetSpec,
    config: Config,
    bundle: TokenizerBundle,
    encoder: Encoder,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[Any, SourceReport]:
    """One dataset (a config entry, or a `Source` with rows in memory) as token rows + report."""
    from datasets import load_from_disk

    source = source if isinstance(source, Source) else Source(source)
    spec, path = source.spec, source.label(config)
    use_cache = use_cache and cacheable(source)
    # Uncached data gets a fresh fingerprint: nothing known about it identifies its content.
    key = cache_key(spec, path, config, bundle) if cacheable(source) else uuid.uuid4().hex
    folder = cache_root(config) / key
    if use_cache and (folder / "report.json").is_file():
        report = SourceReport(**json.loads((folder / "report.json").read_text()))
        report.cached = True
        if report.kept == 0:  # nothing kept: no data was saved (datasets cannot load 0 shards)
            return _empty_dataset(key), report
        return load_from_disk(str(folder / "data")), report

    with cyclic_gc_paused():
        (columns, where, problems), formats = _encode_rows(source, encoder, path, config, progress)
    if problems and not config.data.skip_invalid:
        shown = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        hint = "" if source.in_memory else " (run `exemplar data validate` to list them all)"
        hint += "; set data.skip_invalid: true to train on the valid rows"
        raise DataError(f"{len(problems)} invalid rows in {path}{hint}:\n{shown}{more}", problems)
    ds, report = _dataset(columns, where, path, fingerprint=key)
    report.invalid, report.invalid_examples = len(problems), [str(p) for p in problems[:5]]
    report.formats = formats
    if splits_turns(config.mask):
        _count_turn_examples(report, where)
    if use_cache:
        _write_cache(folder, ds, report)
    return ds, report


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Encoding allocates millions of small objects that never form cycles (strings, id lists)
    and keeps many of them alive until the batch ends; Python's cyclic collector would walk that
    growing heap again and again for nothing (a third of the preparation time, measured).
    Reference counting still frees everything; the collector is restored afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def cacheable(source: Source) -> bool:
    """Whether the result can be found again by a fingerprint (see the module docstring)."""
    return not source.in_memory and not isinstance(CONVERTERS.get(source.spec.format), UserFormat)


def _encode_rows(source: Source, encoder: Encoder, path: str, config: Config, progress: bool):
    """Read, convert and encode every row: ((columns, (file, location) per example, problems),
    the format of each file).

    One process: rows stream from the file through conversion and rendering while the tokenizer
    (on every core) works on the previous batch. num_proc > 1 (and enough rows): the rows are
    read here, and each forked worker process converts and encodes a contiguous share, with its
    tokenizer on one core.
    """
    num_proc = config.data.num_proc or min(os.cpu_count() or 1, 8)
    desc = f"Tokenizing {Path(path).name}"
    spec = source.spec
    rows: Any = source.read(config)
    if num_proc > 1:
        rows = list(rows)
        if len(rows) >= _PARALLEL_MIN_ROWS:
            return _encode_in_workers(encoder, rows, spec, num_proc, progress, desc), _formats_of(rows, spec)
    decided: dict[str, tuple[str, str]] = {}
    with tqdm(desc=desc, unit=" examples", disable=not progress) as bar:
        encoded = encode_examples(encoder, convert_rows(rows, spec, decided), bar.update)
    return encoded, {file: fmt for file, (fmt, _) in decided.items()}


def _formats_of(rows: list, spec: DatasetSpec) -> dict[str, str]:
    """The format each file of the read rows is converted as (what one pass would decide)."""
    if spec.format == "auto":
        return {file: fmt for file, (_, fmt, _) in format_decisions(rows, spec).items()}
    return {row.file: spec.format for row in rows if isinstance(row, SourceRow)}


def encode_examples(encoder: Encoder, converted, on_batch=None):
    """The conversation-level seam: (source, example) pairs, or RowErrors in their place, as
    `formats.convert_rows` yields them, in; token columns out: (columns, where, problems).
    A stage that reads or edits conversations (curation) sits between the two."""
    where: list[tuple[str, str]] = []
    problems: list[RowError] = []
    masker = encoder.masker
    split = masker is not None and splits_turns(masker.mask)

    def examples():
        for item in converted:
            if isinstance(item, RowError):
                problems.append(item)
                continue
            src, example = item
            empty = (
                encoder.masker.nothing_to_train(example)
                if encoder.masker and isinstance(example, Conversation)
                else None
            )
            if empty is not None:
                problems.append(RowError(src.file, src.location, "messages", empty))
                continue
            parts = [example]
            if split and isinstance(example, Conversation):
                parts = every_turn(example, masker.trained_messages(example))
            for part in parts:
                where.append((src.file, src.location))
                yield part

    columns = encoder.encode_columns(examples(), on_batch=on_batch)
    return columns, where, problems


def splits_turns(mask: Any) -> bool:
    """Whether `mask.reasoning: every_turn` makes an example of each trained turn (with every
    token trained there are no turns to tell apart)."""
    return mask.reasoning == "every_turn" and not mask.train_on_everything


def _count_turn_examples(report: SourceReport, where: list[tuple[str, str]]) -> None:
    """With every_turn, the examples of one row sit together in `where`: count the rows."""
    rows = sum(1 for k, place in enumerate(where) if k == 0 or place != where[k - 1])
    report.turn_examples, report.turn_conversations = len(where), rows
    report.rows = rows


def _dataset(columns, where: list[tuple[str, str]], path: str, fingerprint: str):
    """The kept examples as a `datasets.Dataset` (input_ids, labels, row), and the report.

    The dataset's fingerprint is the cache key (it covers everything the rows depend on), which
    spares `datasets` from hashing the whole table."""
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo, Features, List, Value
    from datasets.table import InMemoryTable

    report = SourceReport(path=path, rows=len(columns.drop_reasons))
    report.dropped = dict(Counter(r for r in columns.drop_reasons if r))
    report.turns_without_stop = int(columns.turns_without_stop)
    report.dropped_fields = dict(columns.dropped_fields)
    failed = sorted(columns.details)[:5]
    report.template_errors = [f"{where[i][0]}, {where[i][1]}: {columns.details[i]}" for i in failed]
    report.kept = len(columns.kept)
    offsets = pa.array(columns.offsets.astype(np.int32) if columns.offsets[-1] < 2**31 else columns.offsets)
    list_type = pa.list_ if offsets.type == pa.int32() else pa.large_list
    table = pa.table(
        {
            "input_ids": _list_array(list_type, offsets, columns.input_ids),
            "labels": _list_array(list_type, offsets, columns.labels),
            "row": pa.array(columns.kept, type=pa.int64()),
        }
    )
    features = Features(
        {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "row": Value("int64")}
    )
    info = DatasetInfo(features=features) if list_type is pa.list_ else None
    return Dataset(InMemoryTable(table), info=info, fingerprint=fingerprint), report


def _empty_dataset(fingerprint: str):
    """The dataset of a source that kept no example, with the usual columns."""
    from datasets import Dataset, Features, List, Value

    features = Features(
        {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "row": Value("int64")}
    )
    return Dataset.from_dict({"input_ids": [], "labels": [], "row": []}, features=features)


def _list_array(list_type, offsets, values):
    import pyarrow as pa

    array_type = pa.ListArray if list_type is pa.list_ else pa.LargeListArray
    return array_type.from_arrays(offsets, pa.array(values, type=pa.int32()))


# What forked workers share with the parent without pickling it (set only around the fork).
_SHARED: tuple[Encoder, list, DatasetSpec] | None = None


def _encode_in_workers(
    encoder: Encoder, rows: list, spec: DatasetSpec, num_proc: int, progress: bool, desc: str
):
    """Contiguous shares of the read rows converted and encoded in `num_proc` worker processes;
    results joined in input order, exactly as one pass would give them."""
    import multiprocessing as mp

    from exemplar.data.encode import EncodedColumns

    global _SHARED
    num_proc = min(num_proc, len(rows))
    bounds = [len(rows) * k // num_proc for k in range(num_proc + 1)]
    decided = format_decisions(rows, spec)
    shards = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        # The `format: auto` decisions a single pass would have made before row a.
        known = {f: (fmt, where) for f, (i, fmt, where) in decided.items() if i < a}
        shards.append((a, b, known))
    fork = "fork" in mp.get_all_start_methods()
    # Each worker gets one core's share: its tokenizer runs single-threaded (set before the fork,
    # so the tokenizers library also stays quiet about forking after using its thread pool).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        if fork:
            _SHARED = (encoder, rows, spec)
            pool = mp.get_context("fork").Pool(num_proc)
            jobs = [(None, a, b, known) for a, b, known in shards]
        else:
            pool = mp.get_context("spawn").Pool(num_proc)
            # Spawned workers start with the built-in formats only: send the registered ones.
            extra = user_formats()
            jobs = [((encoder, rows[a:b], spec, extra), 0, b - a, known) for a, b, known in shards]
    finally:
        _SHARED = None
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    parts, where, problems = [], [], []
    with pool, tqdm(total=len(rows), desc=desc, unit=" rows", disable=not progress) as bar:
        for (columns, part_where, part_problems), (a, b, _) in zip(
            pool.imap(_encode_shard, jobs), shards, strict=True
        ):
            parts.append(columns)
            where += part_where
            problems += part_problems
            bar.update(b - a)
    starts = np.cumsum([0] + [len(p.drop_reasons) for p in parts[:-1]]).tolist()
    return EncodedColumns.concat(parts, starts), where, problems


def _encode_shard(job):
    work, start, end, known = job
    if work is None:
        encoder, rows, spec = _shared_in_child()
    else:
        encoder, rows, spec, extra = work
        install(extra)
    return encode_examples(encoder, convert_rows(rows[start:end], spec, dict(known)))


def _shared_in_child():
    if _SHARED is None:
        raise RuntimeError("worker started without the shared rows")
    return _SHARED


# ---------------------------------------------------------------------------------------------
# Cache


def cache_root(config: Config) -> Path:
    root = config.data.cache_dir or os.environ.get("EXEMPLAR_CACHE") or "~/.cache/exemplar"
    return Path(config.resolve_path(root) if config.data.cache_dir else root).expanduser() / "preprocessed"


def cache_key(spec: DatasetSpec, path: str, config: Config, bundle: TokenizerBundle) -> str:
    parts = {
        "version": PIPELINE_VERSION,
        "files": files_fingerprint(path),
        "spec": spec.model_dump(exclude={"weight"}),
        "tokenizer": bundle.fingerprint(),
        "mask": config.mask.model_dump(),
        "max_length": config.max_length,
        "truncation": config.truncation,
        "skip_invalid": config.data.skip_invalid,
        "template_date": config.data.template_date,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def files_fingerprint(path: str) -> str:
    """Hash of the data files' bytes (a Hub id hashes as its name: its revision is not known offline)."""
    p = Path(path)
    if not p.exists():
        return "hub:" + path
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _write_cache(folder: Path, ds: Any, report: SourceReport) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    hint = "set data.cache_dir (or $EXEMPLAR_CACHE) to a disk with room"
    with disk_full_guard(f"the data cache {folder}", folder.parent, lambda: ds.data.nbytes, tmp, hint):
        if len(ds):
            ds.save_to_disk(str(tmp / "data"))
        else:
            tmp.mkdir()
        atomic_write_json(tmp / "report.json", asdict(report))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
