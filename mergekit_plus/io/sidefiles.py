"""Files written beside the weights: config, generation config, tokenizer, model card, recipe copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_plus import __version__
from mergekit_plus.errors import InputError
from mergekit_plus.io.sources import ModelSource

# Copied unchanged from the tokenizer source when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.tiktoken", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
RECIPE_FILE_NAME = "merge_recipe.yaml"
CARD_FILE_NAME = "README.md"
# The revision cell of a local input in the card's Inputs table.
LOCAL_REVISION = "local folder"


ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Settings that change what an adapter's tensors mean, so adapters that differ in one cannot be averaged.
_ADAPTER_SHAPE_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                       "use_rslora", "use_dora", "fan_in_fan_out", "modules_to_save", "bias")


def is_adapter_folder(folder: Path) -> bool:
    """Return whether `folder` is a PEFT adapter: an adapter_config.json and no config.json."""
    return (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / "config.json").is_file()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Read a PEFT adapter's adapter_config.json. Raise InputError when it is not a JSON object."""
    path = folder / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read as JSON ({exc})", hint="save the adapter again") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object", hint="save the adapter again")
    return config


def adapter_base_path(folder: Path, config: dict[str, Any]) -> str | None:
    """Return the adapter's `base_model_name_or_path`, resolved against `folder` when it is a relative path
    to an existing folder (zoo adapters name their base as ../../base), else as written."""
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return None
    candidate = Path(base)
    if not candidate.is_absolute() and (folder / candidate).is_dir():
        return str((folder / candidate).resolve())
    return base


def adapter_differences(reference: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Name the settings in which two adapter configs differ in a way that forbids averaging them."""
    differences = []
    for key in _ADAPTER_SHAPE_KEYS:
        mine, theirs = reference.get(key), other.get(key)
        if isinstance(mine, list) and isinstance(theirs, list):
            mine, theirs = sorted(map(str, mine)), sorted(map(str, theirs))
        if mine != theirs:
            differences.append(f"{key} {theirs!r} vs {mine!r}")
    return differences


def write_adapter_config(folder: Path, source_folder: Path, *, output: Path) -> None:
    """Copy the adapter config of `source_folder` into `folder`, for an adapter that will live at `output`.

    A relative `base_model_name_or_path` that names an existing folder is rewritten relative to
    `output`, so that the merged adapter still finds the same base model.
    """
    config = read_adapter_config(source_folder)
    base = config.get("base_model_name_or_path")
    resolved = adapter_base_path(source_folder, config)
    if isinstance(base, str) and resolved is not None and resolved != base:
        config["base_model_name_or_path"] = os.path.relpath(resolved, output.resolve())
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class InputRecord:
    """One input as the model card reports it."""

    role: str  # "base" or "model"
    source: ModelSource


def write_config(folder: Path, config: dict[str, Any] | None, *, out_dtype: str) -> bool:
    """Write config.json with its dtype set to the stored dtype; return False when there is no config."""
    if config is None:
        return False
    updated = json.loads(json.dumps(config))
    updated["dtype"] = out_dtype
    if "torch_dtype" in updated:
        updated["torch_dtype"] = out_dtype
    text_config = updated.get("text_config")
    if isinstance(text_config, dict) and ("dtype" in text_config or "torch_dtype" in text_config):
        text_config["dtype"] = out_dtype
        text_config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def copy_tokenizer_files(folder: Path, source: ModelSource) -> list[str]:
    """Copy the tokenizer and generation files of `source` byte for byte; return the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        path = source.folder / name
        if path.is_file():
            shutil.copyfile(path, folder / name)
            copied.append(name)
    return copied


def recipe_text(recipe_data: dict[str, Any]) -> str:
    """Return the text of the recipe copy: the parsed recipe dumped as YAML, so comments and layout do not count."""
    return yaml.safe_dump(recipe_data, sort_keys=False, allow_unicode=True)


def recipe_sha256(recipe_data: dict[str, Any]) -> str:
    """Return the SHA-256 of the recipe copy's bytes, so `sha256sum merge_recipe.yaml` checks the card's hash."""
    return hashlib.sha256(recipe_text(recipe_data).encode("utf-8")).hexdigest()


def write_recipe_copy(folder: Path, recipe_data: dict[str, Any]) -> None:
    (folder / RECIPE_FILE_NAME).write_bytes(recipe_text(recipe_data).encode("utf-8"))


def write_model_card(
    folder: Path,
    *,
    method_title: str,
    method_name: str,
    paper: str,
    inputs: Sequence[InputRecord],
    recipe_data: dict[str, Any],
    seed: int,
    compute_dtype: str,
    out_dtype: str,
    tokenizer_source: ModelSource,
    copied_files: Sequence[str],
    parameters: dict[str, Any] | None = None,
    library_name: str = "transformers",
) -> None:
    """Write README.md: YAML front matter (base_model lists Hub ids only) and a body naming the inputs.

    Local inputs appear only in the body, because the Hub reads every `base_model` entry as a repo id.
    Hub inputs are listed with the commit they resolved to. The Settings section contains the recipe's
    SHA-256, which `merge upload` checks against `merge_recipe.yaml` before publishing.
    """
    hub_ids = list(dict.fromkeys(record.source.hub_id for record in inputs if record.source.hub_id))
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = hub_ids
        front["base_model_relation"] = "merge"
    front["library_name"] = library_name
    front["tags"] = ["merge", "mergekit_plus", method_name]

    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Merged model ({method_title})",
        "",
        f"Made with mergekit_plus {__version__} using **{method_title}** (`{method_name}`; {paper}).",
        "",
        "## Inputs",
        "",
        "| role | model | revision | commit |",
        "|---|---|---|---|",
    ]
    for record in inputs:
        source = record.source
        if source.hub_id:
            # snapshot_download reads a missing revision as `main`.
            revision, commit = source.revision or "main", source.commit or "unknown"
        else:
            revision, commit = LOCAL_REVISION, ""
        lines.append(f"| {record.role} | `{source.reference}` | {revision} | {commit} |")
    if parameters is not None:
        lines += [
            "",
            "## Parameters as used",
            "",
            "The recipe's values with the method's defaults filled in (values may still vary by tensor).",
            "",
            "```yaml",
            yaml.safe_dump(parameters, sort_keys=False, allow_unicode=True).rstrip(),
            "```",
        ]
    lines += [
        "",
        "## Settings",
        "",
        f"- seed: {seed}",
        f"- recipe sha256: `{recipe_sha256(recipe_data)}` (of `{RECIPE_FILE_NAME}`)",
        f"- compute dtype: {compute_dtype}; stored dtype: {out_dtype}",
        f"- tokenizer and side files from: `{tokenizer_source.reference}`"
        + (f" ({', '.join(copied_files)})" if copied_files else " (none found)"),
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe_data, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    (folder / CARD_FILE_NAME).write_text("\n".join(lines), encoding="utf-8")
