"""Parquet and CSV columns of the wrong type: a clear error with file, row (or line) and column, in
`validate` and in training's data preparation alike."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exemplar.config import load_config
from exemplar.data.inspect import validate
from exemplar.data.pipeline import prepare_data
from exemplar.errors import DataError
from exemplar.quickstart import tokenizer_path

CHAT = '"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"'


def _parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path


CASES = {
    "messages as an int column": (
        lambda d: _parquet(d / "ints.parquet", {"messages": [1, 2]}),
        ["row 1, field 'messages': expected a list of messages, got a number (1)", "row 2, field 'messages'"],
    ),
    "instruction as a list column": (
        lambda d: _parquet(d / "lists.parquet", {"instruction": [["a"], ["b"]], "output": ["x", "y"]}),
        ["row 1, field 'instruction': expected a string, got a list", "row 2, field 'instruction'"],
    ),
    "messages as plain text in a CSV": (
        lambda d: (d / "text.csv").write_text(f"messages\n5\n{CHAT}\n") and d / "text.csv",
        ["line 2, field 'messages': the cell must hold a JSON list, got the text '5'"],
    ),
    "text content where a string is expected, from a struct column": (
        lambda d: _parquet(
            d / "struct.parquet",
            {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]]},
        ),
        ["row 1, field 'messages[1].content': missing content"],
    ),
}


def _config(tmp_path, file):
    return load_config(
        None,
        tokenizer=tokenizer_path(),
        data={"train": [str(file)], "cache_dir": str(tmp_path / "cache"), "num_proc": 1},
        output_dir=str(tmp_path / "out"),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_column_of_the_wrong_type_is_named_in_validate_and_training(tmp_path, case):
    make, expected = CASES[case]
    file = make(tmp_path)
    config = _config(tmp_path, file)
    result = validate(config)
    found = [str(p) for p in result.problems]
    assert len(found) == len(expected)
    for message, wanted in zip(found, expected, strict=True):
        assert message.startswith(f"{file}, {wanted}"), message
    with pytest.raises(DataError) as raised:
        prepare_data(config, progress=False)
    assert [str(p) for p in raised.value.problems] == found  # the same messages, before any model
