"""Bad bytes, odd encodings and hostile nesting: every problem named by file, line and column,
the rest of the file still read, and never an exception other than the project's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exemplar.config import DatasetSpec
from exemplar.data.formats import convert_all
from exemplar.data.readers import iter_rows
from exemplar.data.schema import SourceRow
from exemplar.errors import DataError, ExemplarError, RowError


def items(path: Path) -> list[SourceRow | RowError]:
    return list(iter_rows(DatasetSpec(path=str(path))))


def test_a_bad_byte_names_its_line_and_the_next_lines_are_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "c"}\n')
    first, bad, last = items(path)
    assert first.data == {"text": "a"} and last.data == {"text": "c"}
    assert isinstance(bad, RowError) and bad.location == "line 2"
    assert "byte 0xe9 at column 14" in bad.message
    assert last.location == "line 3"


def test_a_bad_byte_in_a_json_list_names_the_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"list\.json, line 3: not UTF-8 text: byte 0xe9 at column 14"):
        items(path)


def test_a_bad_byte_in_csv_names_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"instruction,output\nq,a\nq2,caf\xe9\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3: not UTF-8 text: byte 0xe9"):
        items(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_bom_and_crlf_line_endings_are_read_as_plain_lines(tmp_path, suffix):
    content = {
        ".jsonl": '{"text": "a"}\r\n{"text": "b"}\r\n',
        ".txt": "a\r\nb\r\n",
        ".csv": "text\r\na\r\nb\r\n",
    }[suffix]
    path = tmp_path / f"windows{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    got = items(path)
    assert [row.data["text"] for row in got] == ["a", "b"]
    assert [row.location for row in got] == (
        ["line 1", "line 2"] if suffix != ".csv" else ["line 2", "line 3"]
    )


def test_deep_nesting_is_a_row_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "ok"}\n' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n")
    ok, deep = items(path)
    assert ok.data == {"text": "ok"}
    assert isinstance(deep, RowError) and deep.location == "line 2" and "nested too deeply" in deep.message
    listed = tmp_path / "deep.json"
    listed.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json: JSON nested too deeply"):
        items(listed)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf", b"[]"])
def test_an_empty_file_is_reported_even_beside_good_files(tmp_path, content):
    (tmp_path / "a_good.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b_empty.json").write_bytes(content)
    good, empty = items(tmp_path)
    assert good.data == {"text": "a"}
    assert isinstance(empty, RowError) and empty.file.endswith("b_empty.json")
    assert "holds no rows" in empty.message


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
_ROLE_KEYS = ["messages", "conversations", "instruction", "output", "prompt", "completion", "text",
              "input_ids", "labels", "role", "content", "from", "value", "tools", "history"]  # fmt: skip
_ROWS = st.dictionaries(st.sampled_from(_ROLE_KEYS) | st.text(max_size=6), _JSONISH, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_ROWS.map(json.dumps), st.binary(max_size=40)), min_size=0, max_size=6))
def test_any_bytes_give_rows_or_the_projects_own_errors(tmp_path, lines):
    """Readers and converters over random rows and random bytes: rows, or ExemplarError, nothing else."""
    path = tmp_path / "random.jsonl"
    payload = b"\n".join(
        line.encode() if isinstance(line, str) else line.replace(b"\n", b" ") for line in lines
    )
    path.write_bytes(payload)
    spec = DatasetSpec(path=str(path))
    try:
        for item in iter_rows(spec):
            assert isinstance(item, (SourceRow, RowError))
        convert_all(spec)
    except ExemplarError:
        pass


def _config_with_a_bad_row(tmp_path, **data):
    from exemplar.config import load_config
    from tests.test_finetune import ARCHITECTURES, config_dict

    config = config_dict(tmp_path, ARCHITECTURES["llama"], max_steps=2)
    rows = tmp_path / "d.jsonl"
    rows.write_text(rows.read_text() + '{"messages": [{"role": "user", "content": "no answer"}]}\n{"x": \n')
    config["data"].update(data)
    return load_config(None, **config)


def test_training_refuses_invalid_rows_before_loading_any_model(tmp_path):
    from exemplar.train.finetune import finetune

    config = _config_with_a_bad_row(tmp_path)
    config.model.from_config = None
    config.model.path = str(tmp_path / "no-such-model")  # never reached
    with pytest.raises(
        DataError,
        match=r"(?s)2 invalid rows in .*line 25, field .messages.: nothing to train: no assistant message.*line 26: not valid JSON",
    ):
        finetune(config, progress=False)


def test_skip_invalid_trains_on_the_valid_rows_and_reports_the_skipped(tmp_path):
    from exemplar.train.finetune import finetune

    summary = finetune(_config_with_a_bad_row(tmp_path, skip_invalid=True), progress=False)
    assert summary["steps"] == 2
    report = "\n".join(summary["data"][0])
    assert "skipped" in report and "invalid rows (data.skip_invalid)" in report
    assert "line 26: not valid JSON" in report


def test_validate_names_conversations_with_nothing_to_train(tmp_path, capsys):
    from exemplar.cli import main
    from exemplar.quickstart import tokenizer_path

    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "train": False},
            ]
        },
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        f"tokenizer: {tokenizer_path()}\nchat_template: chatml\ndata: {{train: [{{path: d.jsonl}}]}}\n"
    )
    assert main(["data", "validate", str(tmp_path / "c.yaml")]) == 1
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "line 2, field 'messages': nothing to train: no assistant message" in out
    assert "line 3, field 'messages[1].content': assistant message is empty" in out
    assert "line 4, field 'messages': nothing to train: no assistant message" in out
    assert "line 1" not in out
