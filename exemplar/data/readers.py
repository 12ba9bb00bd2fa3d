"""Read raw rows from data files, folders and Hub datasets, one `SourceRow` at a time.

Every row carries its file and a precise, 1-based, human-readable location ("line 12" for
JSON Lines, text and CSV, where CSV counts physical lines; "row 3" for JSON lists, Parquet and
datasets folders), so that a bad row deep in a large file can be found and fixed in an editor.

Readers stream where the format allows (JSON Lines, text, CSV, Parquet batches, datasets
folders); a JSON list is parsed whole because the standard library cannot stream it.

Two entry points share one implementation: `read_rows` raises on the first bad row (the simple
contract for callers that only want valid rows), while `iter_rows` yields the `RowError` in the
row's place and carries on, so `formats.convert_all` can report every problem in one pass.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from exemplar.config import DatasetSpec
from exemplar.data.schema import SourceRow
from exemplar.errors import DataError, RowError

# file_type (config) -> reader key; extensions map onto the same keys.
EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "txt",
    ".arrow": "arrow",
}

# Fields whose CSV cells hold JSON (a CSV cell can only hold text). `prompt`/`completion` are
# parsed only when the cell is a JSON list of objects: a text prompt may start with "[INST]".
CSV_JSON_FIELDS = ("messages", "conversations", "history", "input_ids", "labels", "tools")
CSV_MAYBE_JSON_FIELDS = ("prompt", "completion")

# owner/name, as on the Hub; a path with a data-file extension is a missing file, not a Hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PARQUET_BATCH = 1024

RowOrError = SourceRow | RowError
Resolve = Callable[[str], str]


def read_rows(spec: DatasetSpec, resolve: Resolve = lambda p: p) -> Iterator[SourceRow]:
    """Stream the rows of one dataset; raise `RowError` at the first unreadable row.

    `resolve` maps the configured path to a real one (e.g. `Config.resolve_path`, which makes
    paths relative to the YAML file). Raises `DataError` when the source as a whole is unusable.
    """
    for item in iter_rows(spec, resolve):
        if isinstance(item, RowError):
            raise item
        yield item


def iter_rows(spec: DatasetSpec, resolve: Resolve = lambda p: p) -> Iterator[RowOrError]:
    """Like `read_rows`, but yield each unreadable row's `RowError` instead of stopping."""
    path = Path(resolve(spec.path)).expanduser()
    if path.is_dir():
        yield from _read_dir(path, spec)
    elif path.is_file():
        yield from _read_file(path, _file_kind(path, spec))
    elif _looks_like_hub_id(spec.path):
        yield from _read_hub(spec)
    else:
        raise DataError(f"data file not found: {path}")


# ---------------------------------------------------------------------------------------------
# Dispatch


def _file_kind(path: Path, spec: DatasetSpec) -> str:
    """The reader for a file: `spec.file_type` when set, else the extension."""
    if spec.file_type != "auto":
        return spec.file_type
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(EXTENSIONS))
        raise DataError(
            f"{path}: unknown file type '{path.suffix or '(no extension)'}'; supported: {known}. "
            "Set `file_type:` in the dataset entry to read it as one of json, jsonl, parquet, csv, arrow."
        )
    return kind


def _read_file(path: Path, kind: str) -> Iterator[RowOrError]:
    """The rows of one file; a file with none is a problem of its own (a `RowError` for the whole
    file, so a folder's other files are still read and every problem is reported)."""
    empty = True
    for item in _reader(kind)(path):
        empty = False
        yield item
    if empty:
        yield RowError(str(path), "the whole file", None, "holds no rows (an empty file?)")


def _reader(kind: str) -> Callable[[Path], Iterator[RowOrError]]:
    readers: dict[str, Callable[[Path], Iterator[RowOrError]]] = {
        "json": _read_json,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "csv": _read_csv,
        "txt": _read_txt,
        "arrow": _read_arrow_file,
    }
    return readers[kind]


def _read_dir(path: Path, spec: DatasetSpec) -> Iterator[RowOrError]:
    """A `save_to_disk` folder, or else a folder of data files read in sorted order."""
    if _is_saved_dataset(path):
        yield from _read_saved_dataset(path, spec)
        return
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in EXTENSIONS
        # Skip hidden and tool-private files (.cache, _SUCCESS markers, ...).
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        known = ", ".join(sorted(EXTENSIONS))
        raise DataError(f"{path}: folder holds no data files ({known}) and is not a saved datasets folder")
    for file in files:
        kind = spec.file_type if spec.file_type != "auto" else EXTENSIONS[file.suffix.lower()]
        yield from _read_file(file, kind)


def _as_row(file: str, location: str, index: int, value: Any) -> RowOrError:
    """Wrap a parsed value as a SourceRow, or a RowError when it is not a JSON object."""
    if isinstance(value, Mapping):
        return SourceRow(file=file, location=location, index=index, data=dict(value))
    return RowError(file, location, None, f"each row must be a JSON object, got {json_type(value)}")


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages a user reads."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# JSON, JSON Lines, text


def _read_json(path: Path) -> Iterator[RowOrError]:
    """A JSON list of objects; a .json file holding JSON Lines is read as JSON Lines."""
    text = _read_text(path)
    if not text.strip():
        return  # an empty file: reported by _read_file
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: {_TOO_DEEP}") from None
    except json.JSONDecodeError as e:
        # "Extra data" after a complete first value is the signature of JSON Lines.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _jsonl_lines(path, text.splitlines())
            return
        raise DataError(f"{path}, line {e.lineno} column {e.colno}: not valid JSON: {e.msg}") from None
    if isinstance(value, Mapping) and "\n" not in text.strip():
        yield from _jsonl_lines(path, text.splitlines())  # JSON Lines with a single line
        return
    if isinstance(value, Mapping):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        hint = f" (it holds lists under {', '.join(repr(k) for k in lists)})" if lists else ""
        raise DataError(
            f"{path}: the top level is a JSON object{hint}; expected a list of objects, one per row, "
            "or JSON Lines (one object per line)"
        )
    if not isinstance(value, list):
        raise DataError(f"{path}: the top level must be a list of objects, got {json_type(value)}")
    for i, item in enumerate(value):
        yield _as_row(str(path), f"row {i + 1}", i, item)


_TOO_DEEP = "JSON nested too deeply to read (thousands of levels): not a data row"


def _read_jsonl(path: Path) -> Iterator[RowOrError]:
    yield from _jsonl_lines(path, _decoded_lines(path))


def _jsonl_lines(path: Path, lines: Iterable[str | RowError]) -> Iterator[RowOrError]:
    """One object per non-blank line; `index` counts rows, the location counts lines."""
    index = 0
    for number, line in enumerate(lines, start=1):
        if isinstance(line, RowError):  # bytes that are not UTF-8
            yield line
            index += 1
            continue
        if not line.strip():
            continue
        location = f"line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield RowError(str(path), location, None, f"not valid JSON: {e.msg} (column {e.colno})")
        except RecursionError:
            yield RowError(str(path), location, None, _TOO_DEEP)
        else:
            yield _as_row(str(path), location, index, value)
        index += 1


def _read_txt(path: Path) -> Iterator[RowOrError]:
    """One document per non-empty line, as {"text": line} (trailing newline removed)."""
    index = 0
    for number, line in enumerate(_decoded_lines(path), start=1):
        if isinstance(line, RowError):
            yield line
            index += 1
            continue
        if not line.strip():
            continue
        yield SourceRow(file=str(path), location=f"line {number}", index=index, data={"text": line})
        index += 1


def _decoded_lines(path: Path) -> Iterator[str | RowError]:
    """The file's lines as text without their line ending (LF or CRLF), the byte-order mark
    Windows editors write removed; a line that is not UTF-8 becomes a RowError naming its line
    and column, and the lines after it are still read."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield RowError(str(path), f"line {number}", None, _not_utf8(raw, e))


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    column = len(raw[: e.start].decode("utf-8", "replace")) + 1
    return f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {column} (save the file as UTF-8)"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: {_not_utf8(data[line_start:], _shifted(e, line_start))}"
        ) from None


def _shifted(e: UnicodeDecodeError, offset: int) -> UnicodeDecodeError:
    return UnicodeDecodeError(e.encoding, e.object, e.start - offset, e.end - offset, e.reason)


# ---------------------------------------------------------------------------------------------
# CSV


def _read_csv(path: Path) -> Iterator[RowOrError]:
    """Rows as header -> cell dicts; the location is the physical line where the row starts.

    `csv.reader` is used directly (rather than `DictReader`, which silently skips blank lines)
    so that the start line of every record, including quoted multi-line cells, is exact.
    """
    with path.open("rb") as f:
        reader = csv.reader(_csv_text_lines(path, f))
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        end = reader.line_num
        index = 0
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:  # a blank line
                continue
            yield _csv_row(path, f"line {start}", index, header, cells)
            index += 1


def _csv_text_lines(path: Path, f: Any) -> Iterator[str]:
    """Physical lines for `csv.reader`, line endings kept (it needs them inside quoted cells)."""
    for number, raw in enumerate(f, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            # A CSV record can span lines, so the rest of the file cannot be trusted: stop here.
            raise DataError(f"{path}, line {number}: {_not_utf8(raw, e)}") from None


def _csv_row(path: Path, location: str, index: int, header: list[str], cells: list[str]) -> RowOrError:
    if len(cells) != len(header):
        return RowError(
            str(path), location, None, f"has {len(cells)} cells but the header has {len(header)} columns"
        )
    data: dict[str, Any] = dict(zip(header, cells, strict=True))
    for name in CSV_JSON_FIELDS:
        cell = data.get(name)
        if not isinstance(cell, str):
            continue
        if not cell.strip():
            data[name] = None  # an empty cell: the field is absent
        elif cell.lstrip()[:1] in "[{":
            try:
                data[name] = json.loads(cell)
            except json.JSONDecodeError as e:
                if name != "tools":  # tools may stay a string; formats reports it precisely
                    return RowError(str(path), location, name, f"cell is not valid JSON: {e.msg}")
        elif name != "tools":  # these fields are lists: plain text here is the wrong column type
            shown = cell if len(cell) <= 40 else cell[:40] + "..."
            return RowError(
                str(path), location, name, f"the cell must hold a JSON list, got the text {shown!r}"
            )
    for name in CSV_MAYBE_JSON_FIELDS:
        cell = data.get(name)
        if isinstance(cell, str) and cell.lstrip().startswith("[{"):
            try:
                parsed = json.loads(cell)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed):
                data[name] = parsed
    return SourceRow(file=str(path), location=location, index=index, data=data)


# ---------------------------------------------------------------------------------------------
# Parquet, Arrow, datasets folders, the Hub


def _read_parquet(path: Path) -> Iterator[RowOrError]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            yield SourceRow(file=str(path), location=f"row {index + 1}", index=index, data=row)
            index += 1


def _read_arrow_file(path: Path) -> Iterator[RowOrError]:
    """A single Arrow file: the IPC stream format that `datasets` writes, or the file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None
    index = 0
    for batch in table.to_batches(max_chunksize=_PARQUET_BATCH):
        for row in batch.to_pylist():
            yield SourceRow(file=str(path), location=f"row {index + 1}", index=index, data=row)
            index += 1


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_saved_dataset(path: Path, spec: DatasetSpec) -> Iterator[RowOrError]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several unrelated types for a corrupt folder
        raise DataError(f"{path}: cannot load the saved dataset ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            splits = ", ".join(loaded) or "(none)"
            raise DataError(f"{path}: no split '{spec.split}'; available splits: {splits}. Set `split:`.")
        loaded = loaded[spec.split]
    yield from _dataset_rows(str(path), loaded)


def _dataset_rows(file: str, dataset: Any) -> Iterator[RowOrError]:
    for i, row in enumerate(dataset):
        yield SourceRow(file=file, location=f"row {i + 1}", index=i, data=dict(row))


def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and Path(path).suffix.lower() not in EXTENSIONS


def _offline_requested() -> bool:
    values = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    return any(v is not None and v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in values)


def _read_hub(spec: DatasetSpec) -> Iterator[RowOrError]:
    """`datasets.load_dataset` for an owner/name id that is not a local path."""
    import datasets

    neither = f"'{spec.path}' is neither a local file or folder nor a reachable Hub dataset"
    # `datasets` reads the offline switches once, at import; honour one set later without
    # waiting through its network retries.
    if _offline_requested() and not datasets.config.HF_HUB_OFFLINE:
        raise DataError(f"{neither} (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        dataset = datasets.load_dataset(spec.path, name=spec.name, split=spec.split)
    except Exception as e:  # network, auth, missing config or split: all mean "cannot use this"
        raise DataError(f"{neither}: {type(e).__name__}: {e}") from None
    label = spec.path if spec.name is None else f"{spec.path} ({spec.name})"
    yield from _dataset_rows(f"{label} [{spec.split}]", dataset)
