"""Helpers of the end-to-end tests: write a recipe, run the CLI, and inspect what it wrote."""

from __future__ import annotations

import json
import re
import struct
import traceback
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")

# A wide terminal, so that no message is wrapped in the middle of a path or a tensor name.
CLI_ENV = {"COLUMNS": "500", "NO_COLOR": "1", "TERM": "dumb"}


def write_recipe(folder: Path, recipe: dict, *, name: str = "recipe.yaml") -> Path:
    """Write `recipe` as YAML into `folder`, with every `Path` in it written as a string."""
    path = folder / name
    path.write_text(yaml.safe_dump(_plain(recipe), sort_keys=False))
    return path


def two_task_recipe(method: str, tmp_path: Path, base: Path, fine_tunes: tuple[Path, Path], *, parameters: dict,
                    data: dict | None, output: str = "merged") -> dict:
    """Return a recipe of a method that learns from `data:`, over two fine-tunes of tasks `alpha` and `beta`."""
    recipe = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": fine_tunes[0], "task": "alpha"}, {"model": fine_tunes[1], "task": "beta"}],
        "parameters": parameters,
        "output": {"path": tmp_path / output},
    }
    if data is not None:
        recipe["data"] = data
    return recipe


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def invoke(args: list[str], *, expected_exit: int):
    """Run `merge ARGS` in-process with typer's CliRunner and check its exit code.

    On an unexpected exit code the assertion message shows the output and any traceback,
    so a failing test explains itself.
    """
    from typer.testing import CliRunner

    from mergekit_plus.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args], env=CLI_ENV)
    if result.exit_code != expected_exit:
        details = result.output
        if result.exc_info is not None and not isinstance(result.exception, SystemExit):
            details += "\n" + "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"merge {' '.join(map(str, args))}: exit {result.exit_code}, expected {expected_exit}\n{details}")
    return result


def message_of(result) -> str:
    """Return the CLI's output with runs of whitespace collapsed, for matching with `re.search`."""
    return " ".join(result.output.split())


def assert_mentions(text: str, *patterns: str) -> None:
    """Assert that each regex in `patterns` matches `text`, ignoring case."""
    for pattern in patterns:
        assert re.search(pattern, text, flags=re.IGNORECASE), f"no match for {pattern!r} in:\n{text}"


def shape_pattern(*dims: int) -> str:
    """Return a regex for a shape written as (34, 32), [34, 32], torch.Size([34, 32]) or 34x32."""
    return r"[\[(]?" + r"\s*[,x×]\s*".join(str(dim) for dim in dims) + r"\s*,?\s*[\])]?"


def load_and_generate(folder: Path, *, new_tokens: int = 4):
    """Load a merged folder with `transformers`, check every key matched, and generate a few tokens.

    Returns the loaded model.
    """
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert list(info["missing_keys"]) == [], f"missing keys: {info['missing_keys']}"
    assert list(info["unexpected_keys"]) == [], f"unexpected keys: {info['unexpected_keys']}"
    assert list(info["mismatched_keys"]) == [], f"mismatched keys: {info['mismatched_keys']}"

    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("hello world", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    assert generated.shape == (1, inputs["input_ids"].shape[1] + new_tokens)
    return model


def weight_files(folder: Path) -> list[Path]:
    """Return the `.safetensors` files of a checkpoint folder, sorted by name."""
    return sorted(folder.glob("*.safetensors"))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint folder, from one file or from all its shards."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        tensors.update(load_file(path))
    return tensors


def read_header(path: Path) -> dict:
    """Return the JSON header of a `.safetensors` file, as stored (dtype names such as "F16")."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def header_dtypes(folder: Path) -> dict[str, str]:
    """Return the stored dtype name of every tensor in a checkpoint folder."""
    dtypes = {}
    for path in weight_files(folder):
        header = read_header(path)
        dtypes.update({name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"})
    return dtypes


def file_metadata(path: Path) -> dict[str, str] | None:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def read_card(folder: Path) -> tuple[dict, str]:
    """Split the model card `README.md` into its YAML front matter and its body."""
    text = (folder / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, flags=re.DOTALL)
    assert match, f"README.md has no YAML front matter:\n{text[:500]}"
    return yaml.safe_load(match.group(1)) or {}, match.group(2)


def folder_listing(folder: Path) -> dict[str, bytes]:
    """Return every file under `folder` (hidden ones too) with its bytes, keyed by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
