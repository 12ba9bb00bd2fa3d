"""Durable writes: the target holds the old or the new content, never a part, and no temp is left."""

from __future__ import annotations

import json
import os

import pytest

from exemplar.fsio import atomic_text_writer, atomic_write_json, atomic_write_text


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2, "text": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 2, "text": "é"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_written_file_is_readable_by_others_under_default_umask(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import exemplar.fsio

        importlib.reload(exemplar.fsio)
        path = exemplar.fsio.atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_old_content(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_streamed_text_writer_publishes_only_a_complete_file(tmp_path):
    target = tmp_path / "records.jsonl"
    with atomic_text_writer(target) as f:
        f.write("one\n")
        assert not target.exists()  # nothing visible while the stream is being written
        f.write("two é\n")
    assert target.read_text(encoding="utf-8") == "one\ntwo é\n"
    with pytest.raises(RuntimeError), atomic_text_writer(target) as f:
        f.write("half")
        raise RuntimeError("crash mid-stream")
    assert target.read_text(encoding="utf-8") == "one\ntwo é\n"
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
