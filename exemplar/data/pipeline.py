"""From the config's datasets to training rows: convert, render, mask, tokenize, cache, report.

Each dataset is encoded on its own and cached on disk under a fingerprint of its files'
contents, the tokenizer, the template and every option that changes the result, so a second or
resumed run loads Arrow files instead of tokenizing again, and any changed option misses the
cache. Nothing is dropped silently: every dropped row is counted by reason in the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exemplar.config import Config, DatasetSpec
from exemplar.data.encode import DROP_TEMPLATE, Encoder
from exemplar.data.formats import convert_all
from exemplar.data.masking import ChatMasker
from exemplar.data.schema import example_from_dict, example_to_dict
from exemplar.data.tokenizer import TokenizerBundle, load_tokenizer
from exemplar.errors import DataError

log = logging.getLogger(__name__)

# Bump when the encoding logic changes, so caches written by older code are not reused.
PIPELINE_VERSION = "1"
# Below this many rows a single process is faster than starting workers.
_PARALLEL_MIN_ROWS = 4096


@dataclass
class SourceReport:
    path: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    turns_without_stop: int = 0
    template_errors: list[str] = field(default_factory=list)  # the first few, with row locations
    cached: bool = False

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.rows} rows, {self.kept} kept" + (" (cached)" if self.cached else "")]
        for reason, count in sorted(self.dropped.items()):
            out.append(f"  dropped {count} ({reason})")
        if self.turns_without_stop:
            out.append(f"  warning: {self.turns_without_stop} trained turns have no stop token after them")
        out += [f"  {msg}" for msg in self.template_errors]
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
    masker = ChatMasker(bundle.template, bundle.variables, bundle.special_tokens, config.mask)
    if masker.stop_token is None and config.mask.train_stop_token:
        log.warning(
            "the chat template closes assistant turns with no stop token: a model trained on it "
            "will not learn to stop. Use a template that ends turns with a special token."
        )
    return masker


def build_encoder(config: Config, bundle: TokenizerBundle, masker: ChatMasker) -> Encoder:
    return Encoder(bundle.tokenizer, masker, config.max_length, config.truncation)


def prepare_data(
    config: Config, bundle: TokenizerBundle | None = None, use_cache: bool = True, progress: bool = True
) -> PreparedData:
    """Encode every train and eval dataset, apply weights and the held-out fraction."""
    from datasets import concatenate_datasets

    bundle = bundle or load_tokenizer(config)
    masker = build_masker(config, bundle)
    encoder = build_encoder(config, bundle, masker)
    reports, train_parts, eval_parts = [], [], []
    for spec in config.data.train:
        ds, report = encode_source(spec, config, bundle, encoder, use_cache, progress)
        reports.append(report)
        if config.data.eval is None and config.data.eval_fraction > 0 and len(ds) > 1:
            split = ds.train_test_split(
                test_size=config.data.eval_fraction, seed=config.train.seed, shuffle=True
            )
            ds = split["train"]
            eval_parts.append(split["test"])
        train_parts.append(_apply_weight(ds, spec.weight, config.train.seed))
    for spec in config.data.eval or []:
        ds, report = encode_source(spec, config, bundle, encoder, use_cache, progress)
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
    spec: DatasetSpec,
    config: Config,
    bundle: TokenizerBundle,
    encoder: Encoder,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[Any, SourceReport]:
    from datasets import load_from_disk

    path = config.resolve_path(spec.path)
    key = cache_key(spec, path, config, bundle)
    folder = cache_root(config) / key
    if use_cache and (folder / "report.json").is_file():
        report = SourceReport(**json.loads((folder / "report.json").read_text()))
        report.cached = True
        return load_from_disk(str(folder / "data")), report

    examples, problems = convert_all(spec, resolve=config.resolve_path)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(
            f"{len(problems)} invalid rows in {path} (run `exemplar data validate` to list them all):\n{shown}{more}",
            problems,
        )
    ds, report = _encode_examples(examples, encoder, path, config, progress)
    if use_cache:
        _write_cache(folder, ds, report)
    return ds, report


def _encode_examples(examples: list, encoder: Encoder, path: str, config: Config, progress: bool):
    from datasets import Dataset, Features, Sequence, Value, disable_progress_bars, enable_progress_bars

    rows = [json.dumps(example_to_dict(ex)) for _, ex in examples]
    where = [f"{src.file}, {src.location}" for src, _ in examples]
    source = Dataset.from_dict({"example": rows, "row": list(range(len(rows)))})
    num_proc = config.data.num_proc or min(os.cpu_count() or 1, 8)
    if len(rows) < _PARALLEL_MIN_ROWS:
        num_proc = 1
    features = Features(
        {
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "row": Value("int64"),
            "drop_reason": Value("string"),
            "turns_without_stop": Value("int32"),
            "detail": Value("string"),
        }
    )
    (enable_progress_bars if progress else disable_progress_bars)()
    encoded = source.map(
        _encode_batch,
        fn_kwargs={"encoder": encoder},
        batched=True,
        batch_size=512,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["example"],
        features=features,
        desc=f"Tokenizing {Path(path).name}",
        load_from_cache_file=False,
    )
    reasons = encoded["drop_reason"]
    report = SourceReport(path=path, rows=len(rows))
    report.dropped = dict(Counter(r for r in reasons if r))
    report.turns_without_stop = int(sum(encoded["turns_without_stop"]))
    failed = [i for i, r in enumerate(reasons) if r == DROP_TEMPLATE][:5]
    report.template_errors = [f"{where[i]}: {encoded[i]['detail']}" for i in failed]
    kept = encoded.filter(lambda r: r is None, input_columns="drop_reason")
    kept = kept.remove_columns(["drop_reason", "turns_without_stop", "detail"])
    report.kept = len(kept)
    return kept, report


def _encode_batch(batch: dict[str, list], encoder: Encoder) -> dict[str, list]:
    results = encoder.encode([example_from_dict(json.loads(s)) for s in batch["example"]])
    return {
        "input_ids": [r.input_ids for r in results],
        "labels": [r.labels for r in results],
        "row": batch["row"],
        "drop_reason": [r.drop_reason for r in results],
        "turns_without_stop": [r.turns_without_stop for r in results],
        "detail": [r.detail for r in results],
    }


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
    try:
        ds.save_to_disk(str(tmp / "data"))
        (tmp / "report.json").write_text(json.dumps(asdict(report)))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
