"""Files a run writes and reads back (lightning_veripo.files): JSONL errors name file:line, writes are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lightning_veripo.files import read_jsonl, write_jsonl_atomic, write_text_atomic


def test_jsonl_lines_come_back_with_their_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_jsonl_atomic(path, [{"x": 1}, {"y": "é\u2028z"}])
    path.write_text(path.read_text() + "\n")
    assert list(read_jsonl(path)) == [(1, {"x": 1}), (2, {"y": "é\u2028z"})]


def test_a_torn_or_binary_jsonl_line_names_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": 2\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON line .*cut short"):
        list(read_jsonl(path))
    path.write_bytes(b'{"x": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8"):
        list(read_jsonl(path))


def test_an_atomic_write_replaces_whole_leaves_no_temp_file_and_is_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_text_atomic(path, json.dumps({"v": 1}))
    write_text_atomic(path, json.dumps({"v": 2}))
    assert json.loads(path.read_text()) == {"v": 2}
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(ValueError, match="not valid Unicode"):
        write_text_atomic(tmp_path / "bad.json", "\udc80")
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'missing' / 'x.json'}"):
        write_text_atomic(tmp_path / "missing" / "x.json", "{}")
