"""Files written beside the weights: config, generation config, tokenizer, model card, recipe copy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_plus import __version__
from mergekit_plus.io.sources import ModelSource

# Copied unchanged from the tokenizer source when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.tiktoken", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
RECIPE_FILE_NAME = "merge_recipe.yaml"


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


def write_recipe_copy(folder: Path, recipe_data: dict[str, Any]) -> None:
    text = yaml.safe_dump(recipe_data, sort_keys=False, allow_unicode=True)
    (folder / RECIPE_FILE_NAME).write_text(text, encoding="utf-8")


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
) -> None:
    """Write README.md: YAML front matter (base_model lists Hub ids only) and a body naming the inputs."""
    hub_ids = list(dict.fromkeys(record.source.hub_id for record in inputs if record.source.hub_id))
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = hub_ids
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
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
        "| role | model | revision |",
        "|---|---|---|",
    ]
    for record in inputs:
        source = record.source
        revision = source.commit or source.revision or ("local" if not source.hub_id else "")
        lines.append(f"| {record.role} | `{source.reference}` | {revision} |")
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
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
