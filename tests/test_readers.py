"""Readers: every file type yields SourceRows with exact, 1-based locations, and bad input says where."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exemplar.config import DatasetSpec
from exemplar.data.readers import iter_rows, read_rows
from exemplar.data.schema import SourceRow
from exemplar.errors import DataError, RowError


def spec(path: Path | str, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(path), **kw)


def rows(path: Path | str, **kw) -> list[SourceRow]:
    return list(read_rows(spec(path, **kw)))


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# JSON and JSON Lines


def test_json_list_rows_have_row_locations(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    got = rows(path)
    assert [(r.location, r.index, r.data) for r in got] == [
        ("row 1", 0, {"text": "a"}),
        ("row 2", 1, {"text": "b"}),
    ]
    assert got[0].file == str(path)


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r.location, r.index) for r in rows(path)] == [("line 1", 0), ("line 3", 1)]


def test_json_file_with_one_object_on_one_line_is_one_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "only"}\n')
    assert [r.data for r in rows(path)] == [{"text": "only"}]


def test_json_top_level_object_is_a_data_error_naming_its_lists(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}, indent=2))
    with pytest.raises(DataError, match=r"d\.json.*top level is a JSON object.*'data'"):
        rows(path)


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=r"d\.json, line 3 column \d+: not valid JSON"):
        rows(path)


def test_json_list_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, ["not", "an", "object"]]))
    with pytest.raises(RowError) as e:
        rows(path)
    assert e.value.location == "row 2" and "d.json" in str(e.value) and "a list" in str(e.value)


def test_jsonl_skips_blank_lines_and_counts_physical_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [(r.location, r.index, r.data["text"]) for r in rows(path)] == [
        ("line 1", 0, "a"),
        ("line 4", 1, "b"),
    ]


def test_bad_jsonl_line_names_file_line_and_json_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b",}\n{"text": "c"}\n')
    with pytest.raises(RowError) as e:
        rows(path)
    message = str(e.value)
    assert "train.jsonl" in message and "line 2" in message and "not valid JSON" in message
    # iter_rows reports the bad line in its place and carries on to the next one.
    items = list(iter_rows(spec(path)))
    assert isinstance(items[1], RowError)
    assert (
        isinstance(items[2], SourceRow) and items[2].data == {"text": "c"} and items[2].location == "line 3"
    )


def test_jsonl_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, 42])
    with pytest.raises(RowError, match=r"d\.jsonl, line 2: each row must be a JSON object, got a number"):
        rows(path)


def test_ndjson_extension(tmp_path):
    path = write_jsonl(tmp_path / "d.ndjson", [{"text": "a"}])
    assert rows(path)[0].location == "line 1"


def test_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('\ufeff{"text": "é"}\n'.encode())
    assert rows(path)[0].data == {"text": "é"}


# ---------------------------------------------------------------------------------------------
# Text, CSV, Parquet


def test_txt_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first doc\n\nsecond doc\r\n")
    assert [(r.location, r.index, r.data) for r in rows(path)] == [
        ("line 1", 0, {"text": "first doc"}),
        ("line 3", 1, {"text": "second doc"}),
    ]


def test_csv_physical_lines_json_cells_and_multiline_quotes(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    quoted = messages.replace('"', '""')
    path.write_text(
        "instruction,output,messages\n"
        'a,"two\nlines",\n'  # a record spanning lines 2-3
        "\n"  # blank line 4
        f'b,c,"{quoted}"\n'  # line 5
        '"[INST] keep me",d,\n',  # not a JSON field: stays text
        encoding="utf-8",
    )
    got = rows(path)
    assert [r.location for r in got] == ["line 2", "line 5", "line 6"]
    assert got[0].data == {"instruction": "a", "output": "two\nlines", "messages": None}
    assert got[1].data["messages"] == json.loads(messages)
    assert got[2].data["instruction"] == "[INST] keep me"


def test_csv_prompt_cell_with_message_list_is_parsed_but_bracket_text_is_not(tmp_path):
    path = tmp_path / "d.csv"
    prompt = json.dumps([{"role": "user", "content": "q"}]).replace('"', '""')
    path.write_text(f'prompt,completion\n"{prompt}",a\n"[not json",b\n')
    got = rows(path)
    assert got[0].data["prompt"] == [{"role": "user", "content": "q"}]
    assert got[1].data["prompt"] == "[not json"


def test_csv_bad_json_cell_and_wrong_cell_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('input_ids,labels\n"[1, 2,",\n1,2,3\n')
    items = list(iter_rows(spec(path)))
    assert isinstance(items[0], RowError) and items[0].location == "line 2" and items[0].field == "input_ids"
    assert "bad.csv" in str(items[0]) and "not valid JSON" in str(items[0])
    assert isinstance(items[1], RowError) and items[1].location == "line 3"
    assert "3 cells but the header has 2" in str(items[1])


def test_parquet_rows_with_nested_messages(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ]
    )
    pq.write_table(table, path)
    got = rows(path)
    assert [(r.location, r.index) for r in got] == [("row 1", 0), ("row 2", 1)]
    assert got[1].data["messages"][1] == {"role": "assistant", "content": "b"}


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        rows(path)


# ---------------------------------------------------------------------------------------------
# Folders, datasets, type overrides, missing paths


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    one.save_to_disk(str(tmp_path / "one"))
    got = rows(tmp_path / "one")
    assert [(r.location, r.index, r.data) for r in got] == [
        ("row 1", 0, {"text": "a"}),
        ("row 2", 1, {"text": "b"}),
    ]

    both = datasets.DatasetDict({"train": one, "test": datasets.Dataset.from_list([{"text": "t"}])})
    both.save_to_disk(str(tmp_path / "both"))
    assert [r.data["text"] for r in rows(tmp_path / "both", split="test")] == ["t"]
    assert len(rows(tmp_path / "both")) == 2  # split defaults to train
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: train, test"):
        rows(tmp_path / "both", split="validation")


def test_arrow_file(tmp_path):
    path = tmp_path / "d.arrow"
    table = pa.Table.from_pylist([{"text": "a"}, {"text": "b"}])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert [(r.location, r.data["text"]) for r in rows(path)] == [("row 1", "a"), ("row 2", "b")]


def test_folder_of_files_in_sorted_order_skipping_hidden(tmp_path):
    folder = tmp_path / "mix"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", [{"text": "b1"}])
    (folder / "a.txt").write_text("a1\na2\n")
    write_jsonl(folder / "sub" / "c.jsonl", [{"text": "c1"}])
    write_jsonl(folder / ".hidden.jsonl", [{"text": "no"}])
    (folder / "notes.md").write_text("ignored")
    got = rows(folder)
    assert [r.data["text"] for r in got] == ["a1", "a2", "b1", "c1"]
    assert got[2].file == str(folder / "b.jsonl") and got[2].index == 0


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        rows(tmp_path / "empty")


def test_file_type_overrides_extension(tmp_path):
    path = write_jsonl(tmp_path / "d.data", [{"text": "a"}])
    assert rows(path, file_type="jsonl")[0].location == "line 1"
    with pytest.raises(DataError, match=r"unknown file type '\.data'.*`file_type:`"):
        rows(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        rows(tmp_path / "nope.jsonl")
    # owner/name-shaped but with a data-file extension: a missing file, not a Hub id.
    with pytest.raises(DataError, match=r"data file not found: data/train\.json"):
        rows("data/train.json")


def test_resolve_maps_the_configured_path(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    got = list(read_rows(spec("d.jsonl"), resolve=lambda p: str(tmp_path / p)))
    assert got[0].data == {"text": "a"}


def test_hub_id_fallback_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="nonexistent-owner/nonexistent-dataset' is neither a local file"):
        rows("nonexistent-owner/nonexistent-dataset")


# ---------------------------------------------------------------------------------------------
# Real third-party files (skipped where absent)


def test_real_text_and_jsonl_files(shared_data):
    wiki = rows(shared_data / "wiki_demo.txt")
    assert wiki and all(r.data["text"].strip() for r in wiki)
    assert wiki[0].location == "line 1"
    c4 = rows(shared_data / "c4_demo.jsonl")
    assert len(c4) == 300 and all(isinstance(r.data["text"], str) for r in c4)


def test_non_utf8_text_names_the_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(RowError, match=r"latin1\.jsonl, line 1: not UTF-8 text: byte 0xe9 at column 14"):
        rows(path)
