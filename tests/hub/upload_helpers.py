"""Helpers of the upload tests: recipes, the token the stand-in accepts, and checks of what arrived."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

HUB_TOKEN = "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0123"
TARGET_REPO = "my-org/tiny-merge"


def ties_recipe(base, fine_tunes, output: Path, **extra) -> dict:
    """Return a TIES recipe over `base` and `fine_tunes`, written to `output` in shards of at most 20 KB."""
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": 1.0, "density": 0.5}} for fine_tune in fine_tunes],
        "parameters": {"lambda": 1.0},
        "output": {"path": output, "shard_size": "20KB"},
    }
    recipe.update(extra)
    return recipe


def copy_folder(source: Path, destination: Path) -> Path:
    """Copy a merged folder, so that a test can change the copy."""
    shutil.copytree(source, destination)
    return destination


def folder_files(folder: Path) -> dict[str, bytes]:
    """Return every file of `folder` that an upload sends (hidden paths left out), keyed by repo path."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
