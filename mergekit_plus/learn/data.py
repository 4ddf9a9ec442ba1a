"""The recipe's `data:` section: reading prompt files and mapping them to the models' tasks.

A data source is a JSON Lines file (rows with a "prompt", and for labelled examples an "answer"),
a text file (one prompt per line), or a folder. A folder is read as a Hugging Face dataset saved
with `save_to_disk` when it contains `dataset_info.json` (this needs the `datasets` package), and
otherwise as every `*.jsonl` file in it, in name order.
"""

from __future__ import annotations

import json
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
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    rows: list[dict[str, Any]] = []
    for file in files:
        lines = file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if file.suffix in TEXT_SUFFIXES:
                rows.append({"prompt": line})
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number}: invalid JSON: {error.msg}") from error
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{file}:{number}: expected an object with a string "prompt"')
            rows.append(row)
    if not rows:
        raise ValueError(f"data source {path} contains no rows")
    return rows


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
