"""Reading calibration texts: the same rows as the recipe's `data:` files, globs and a per-file limit."""

from __future__ import annotations

import pytest

from mergekit_plus.errors import InputError
from mergekit_plus.moe.calibration import read_calibration_texts


def test_reads_text_fields_and_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n{"text": "two", "answer": "x"}\n')
    (tmp_path / "b.txt").write_text("three\nfour\n")
    assert read_calibration_texts(str(tmp_path / "*"), limit=10) == ["one", "two", "three", "four"]


def test_limit_applies_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("1\n2\n3\n")
    (tmp_path / "b.txt").write_text("4\n5\n")
    assert read_calibration_texts(str(tmp_path / "*.txt"), limit=1) == ["1", "4"]


def test_row_without_text_names_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"label": 3}\n')
    with pytest.raises(InputError, match=r'a\.jsonl:2: expected an object with a string "text" or "prompt"'):
        read_calibration_texts(str(path), limit=10)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match=r"a\.jsonl:2: invalid JSON"):
        read_calibration_texts(str(path), limit=10)
