"""The recipe's `data:` section: reading prompt files and mapping them to the models' tasks.

A data source is a JSON Lines file (rows with a "prompt", and for labelled examples an "answer"),
a text file (one prompt per line), or a folder. A folder is read as a Hugging Face dataset saved
with `save_to_disk` when it contains `dataset_info.json` (this needs the `datasets` package), and
otherwise as every `*.jsonl` file in it, in name order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
FINE_TUNE_PREFIX = "ft-"


def task_of_model(model: str, task: str | None) -> str:
    """Return the task of a model entry: its `task:` key, else its folder name less the `ft-` prefix."""
    if task:
        return task
    name = Path(model.rstrip("/")).name
    return name.removeprefix(FINE_TUNE_PREFIX)


def check_data_source(path: str) -> str | None:
    """Return why `path` cannot be read as a data source, or None when it can. Reads no model."""
    source = Path(path)
    if not source.exists():
        return f"data file {path} not found"
    if source.is_dir():
        if (source / "dataset_info.json").is_file():
            return None
        files = sorted(source.glob("*.jsonl"))
        if not files:
            return f"data folder {path} contains no *.jsonl file and no saved Hugging Face dataset"
        if all(file.stat().st_size == 0 for file in files):
            return f"data folder {path} contains only empty *.jsonl files"
        return None
    if source.suffix not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        return f"data file {path} must end in .jsonl, .json or .txt"
    if not source.read_text(encoding="utf-8").strip():
        return f"data file {path} is empty"
    return None


def read_rows(path: str) -> list[dict[str, Any]]:
    """Read every row of a data source as a mapping with at least a "prompt" key.

    Raise ValueError naming the file and line of a row that is not JSON or has no "prompt".
    """
    source = Path(path)
    if source.is_dir() and (source / "dataset_info.json").is_file():
        return _read_saved_dataset(source)
    rows = [row for _, _, row in _numbered_rows(source)]
    if not rows:
        raise ValueError(f"data source {path} contains no rows")
    return rows


def read_labelled_rows(path: str) -> list[dict[str, Any]]:
    """Read every row of a labelled data source: a string "prompt" and a string "answer".

    Raise ValueError naming the file and line of a row without a string "answer", and the source
    when its format has no answers (a text file of prompts).
    """
    source = Path(path)
    if source.is_dir() and (source / "dataset_info.json").is_file():
        rows = _read_saved_dataset(source)
        for index, row in enumerate(rows):
            if not isinstance(row.get("answer"), str):
                raise ValueError(f'dataset {source}, row {index}: expected a string "answer" in a labelled row')
        return rows
    rows = []
    for file, number, row in _numbered_rows(source):
        if file.suffix in TEXT_SUFFIXES:
            raise ValueError(f'{file} contains prompts only (one per line), but labelled data needs JSON Lines rows '
                             f'with a "prompt" and an "answer"')
        if "answer" not in row:
            raise ValueError(f'{file}:{number}: the row has no "answer"; labelled data needs a string "answer" '
                             'beside the "prompt"')
        if not isinstance(row["answer"], str):
            raise ValueError(f'{file}:{number}: expected a string "answer" in a labelled row, got {row["answer"]!r}')
        rows.append(row)
    if not rows:
        raise ValueError(f"data source {path} contains no rows")
    return rows


def check_labelled_source(path: str) -> str | None:
    """Return why `path` cannot be read as labelled rows, or None when it can. Reads no model."""
    try:
        read_labelled_rows(path)
    except ValueError as error:
        return str(error)
    return None


def read_texts(path: Path, *, fields: Sequence[str], limit: int | None = None) -> list[str]:
    """Read the text of each row of one file: a JSON Lines row's first string field of `fields`, or a line.

    Files ending in .jsonl or .json hold JSON Lines, and any other file one text per line. At most
    `limit` texts are read. Raise ValueError naming the file and line of an invalid row.
    """
    texts = []
    for _, _, row in _numbered_rows(path, fields=fields):
        texts.append(next(row[field] for field in fields if isinstance(row.get(field), str)))
        if limit is not None and len(texts) >= limit:
            break
    return texts


def _numbered_rows(source: Path, *, fields: Sequence[str] = ("prompt",)) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """Yield (file, line number, row) for every non-blank line of a file or of a folder's *.jsonl files.

    A line of a file that is not JSON Lines becomes a row whose first field of `fields` is the line.
    Raise ValueError naming the file and line of a row that is not JSON or has none of `fields`
    as a string.
    """
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    for file in files:
        lines = file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if file.suffix not in JSONL_SUFFIXES:
                yield file, number, {fields[0]: line}
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number}: invalid JSON: {error.msg}") from error
            if not isinstance(row, dict) or not any(isinstance(row.get(field), str) for field in fields):
                expected = " or ".join(f'"{field}"' for field in fields)
                raise ValueError(f"{file}:{number}: expected an object with a string {expected}")
            yield file, number, row


def _read_saved_dataset(folder: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"{folder} is a saved Hugging Face dataset, and reading it needs the `datasets` "
                         "package; install it or export the prompts to JSON Lines") from error
    table = datasets.load_from_disk(str(folder))
    if "prompt" not in table.column_names:
        raise ValueError(f'dataset {folder} has no "prompt" column; its columns: {", ".join(table.column_names)}')
    return [dict(row) for row in table]
