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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from exemplar.config import Config, DatasetSpec, load_config
from exemplar.data.encode import Encoder
from exemplar.data.encode_stream import Tally, encode_to_arrow, token_features
from exemplar.data.formats import CONVERTERS, describe_format
from exemplar.data.masking import ChatMasker
from exemplar.data.registry import UserFormat
from exemplar.data.sources import Source, sources, train_sources
from exemplar.data.tokenizer import TokenizerBundle, load_tokenizer
from exemplar.errors import DataError
from exemplar.fsio import atomic_write_json, disk_full_guard

log = logging.getLogger(__name__)

# Bump when the encoding logic changes, so caches written by older code are not reused.
# 3: formats, every_turn; 4: tool-call and reasoning masks; 5: streamed cache;
# 6: a `length` column, and reasoning passed to templates also as `thinking`
PIPELINE_VERSION = "6"
# A cached dataset's tokens (an Arrow IPC stream, memory-mapped when loaded) beside report.json.
TOKENS_FILE = "tokens.arrow"


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

    import numpy as np

    # Index arrays, not Python lists: a million rows weighted 2 would be 2 million int objects.
    whole, frac, n = int(weight), weight - int(weight), len(ds)
    extra = np.sort(np.asarray(random.Random(seed).sample(range(n), round(frac * n)), dtype=np.int64))
    return ds.select(np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole), extra]))


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
    """One dataset (a config entry, or a `Source` with rows in memory) as token rows + report.

    Cached (the default for files), the tokens stream to an Arrow file in the cache and the
    dataset memory-maps it: memory stays bounded whatever the input size (see encode_stream.py).
    Uncached, the Arrow stream is held in memory."""
    source = source if isinstance(source, Source) else Source(source)
    spec, path = source.spec, source.label(config)
    use_cache = use_cache and cacheable(source)
    # Uncached data gets a fresh fingerprint: nothing known about it identifies its content.
    key = cache_key(spec, path, config, bundle) if cacheable(source) else uuid.uuid4().hex
    folder = cache_root(config) / key
    if use_cache and (folder / "report.json").is_file():
        report = SourceReport(**json.loads((folder / "report.json").read_text()))
        report.cached = True
        return _mapped_tokens(folder / TOKENS_FILE, key), report
    if use_cache:
        return _encode_into_cache(source, encoder, path, config, progress, folder)
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    tally = _encode(source, encoder, path, config, progress, sink)
    table = pa.ipc.open_stream(sink.getvalue()).read_all()
    return _tokens_dataset(table, key, in_memory=True), _source_report(path, tally)


def _encode(source: Source, encoder: Encoder, path: str, config: Config, progress: bool, sink: Any) -> Tally:
    """Encode every row into the Arrow stream `sink`; invalid rows (unless skipped) raise once
    every row was seen, naming the first few."""
    num_proc = config.data.num_proc or min(os.cpu_count() or 1, 8)
    with (
        cyclic_gc_paused(),
        tqdm(desc=f"Tokenizing {Path(path).name}", unit=" rows", disable=not progress) as bar,
    ):
        tally = encode_to_arrow(source.read(config), source.spec, encoder, num_proc, sink, bar.update)
    if tally.invalid and not config.data.skip_invalid:
        shown = "\n".join(f"  {p}" for p in tally.problems[:10])
        more = f"\n  ... and {tally.invalid - 10} more" if tally.invalid > 10 else ""
        hint = "" if source.in_memory else " (run `exemplar data validate` to list them all)"
        hint += "; set data.skip_invalid: true to train on the valid rows"
        raise DataError(f"{tally.invalid} invalid rows in {path}{hint}:\n{shown}{more}", tally.problems)
    return tally


def _source_report(path: str, tally: Tally) -> SourceReport:
    return SourceReport(
        path=path,
        rows=tally.conversations if tally.turn_examples else tally.rows,
        kept=tally.kept,
        dropped=dict(tally.dropped),
        turns_without_stop=tally.turns_without_stop,
        dropped_fields=dict(tally.dropped_fields),
        formats=dict(tally.formats),
        turn_examples=tally.turn_examples,
        turn_conversations=tally.conversations if tally.turn_examples else 0,
        template_errors=tally.template_errors,
        invalid=tally.invalid,
        invalid_examples=[str(p) for p in tally.problems[:5]],
    )


def _encode_into_cache(
    source: Source, encoder: Encoder, path: str, config: Config, progress: bool, folder: Path
) -> tuple[Any, SourceReport]:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written cache, and
    a full disk or an error leaves no temporary folder."""
    import pyarrow as pa

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    file = tmp / TOKENS_FILE
    hint = "set data.cache_dir (or $EXEMPLAR_CACHE) to a disk with room"
    try:
        # The space needed is known only once written: the guard names what was written so far.
        with disk_full_guard(f"the data cache {folder}", folder.parent, lambda: _size(file), tmp, hint):
            tmp.mkdir()
            with pa.OSFile(str(file), "wb") as sink:
                tally = _encode(source, encoder, path, config, progress, sink)
            report = _source_report(path, tally)
            atomic_write_json(tmp / "report.json", asdict(report))
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    return _mapped_tokens(folder / TOKENS_FILE, folder.name), report


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _mapped_tokens(file: Path, fingerprint: str) -> Any:
    from datasets.table import MemoryMappedTable

    return _tokens_dataset(MemoryMappedTable.from_file(str(file)), fingerprint)


def _tokens_dataset(table: Any, fingerprint: str, in_memory: bool = False) -> Any:
    """The kept examples as a `datasets.Dataset` (input_ids, labels, row, trained_tokens).

    The dataset's fingerprint is the cache key (it covers everything the rows depend on), which
    spares `datasets` from hashing the whole table."""
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    if in_memory:
        table = InMemoryTable(table)
    return Dataset(table, info=DatasetInfo(features=token_features()), fingerprint=fingerprint)


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
