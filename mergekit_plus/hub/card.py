"""The model card that goes to the Hub: read with huggingface_hub's card classes, checked, and merged.

`merge run` writes the card (`io/sidefiles.py`). Before an upload, `prepare_card` checks that the
folder's card still describes the folder's recipe copy: it names the method, the parameters, the
seed and the commit of every Hub input, and its recipe hash matches `merge_recipe.yaml`. The card's
front matter is then merged with what the Hub needs from a merge: every key the user added (license,
language, datasets) is kept, and the merge's tags, Hub inputs, `base_model_relation` and
`library_name` are added where they are missing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from mergekit_plus.errors import InputError
from mergekit_plus.io.sidefiles import CARD_FILE_NAME, LOCAL_REVISION, RECIPE_FILE_NAME

REQUIRED_TAGS = ("merge", "mergekit_plus")

_RECIPE_HASH = re.compile(r"^- recipe sha256: `([0-9a-f]{64})`", re.MULTILINE)
_INPUT_ROW = re.compile(r"^\| (base|model) \| `([^`]+)` \| ([^|]*) \| ([^|]*) \|$", re.MULTILINE)
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class CardInput:
    """One row of the card's Inputs table."""

    role: str
    reference: str
    revision: str
    commit: str

    @property
    def is_local(self) -> bool:
        return self.revision == LOCAL_REVISION


@dataclass(frozen=True)
class PreparedCard:
    """The card to upload, with the facts it was checked against.

    `text` is the folder's README.md unchanged when its front matter needed nothing, else the
    card re-rendered by huggingface_hub with the added keys. `added` names what the merge added.
    """

    text: str
    metadata: dict[str, Any]
    method: str
    seed: int
    recipe_sha256: str
    inputs: tuple[CardInput, ...]
    added: tuple[str, ...]


def prepare_card(folder: Path) -> PreparedCard:
    """Check the card of a merge output folder and return it ready to upload.

    Raise InputError listing every problem. The card or recipe copy may be missing or unreadable,
    or the front matter invalid. A `base_model` entry may not be a Hub id. The body may no longer
    name the method, seed, parameters, input commits or the recipe's hash.
    """
    from huggingface_hub import ModelCard

    problems: list[str] = []
    recipe_bytes = _read_bytes(folder / RECIPE_FILE_NAME, problems,
                               missing=f"{RECIPE_FILE_NAME} is missing, so {folder} is not a folder written by `merge run`")
    card_bytes = _read_bytes(folder / CARD_FILE_NAME, problems, missing=f"{CARD_FILE_NAME} (the model card) is missing")
    if recipe_bytes is None or card_bytes is None:
        _raise(folder, problems)

    # 1. The recipe copy, which the card must describe.
    recipe_hash = hashlib.sha256(recipe_bytes).hexdigest()
    try:
        recipe = yaml.safe_load(recipe_bytes.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        _raise(folder, [f"{RECIPE_FILE_NAME} is not valid YAML: {exc}"])
    if not isinstance(recipe, dict) or not isinstance(recipe.get("merge_method"), str):
        _raise(folder, [f"{RECIPE_FILE_NAME} has no `merge_method`, so it is not a recipe"])
    method = recipe["merge_method"]
    seed = recipe.get("seed", 0)

    # 2. The card, parsed as the Hub parses it.
    try:
        card = ModelCard(card_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        _raise(folder, [f"{CARD_FILE_NAME} has invalid front matter: {exc}"])
    metadata = card.data.to_dict()
    body = card.text

    # 3. The body must still describe this merge.
    hashes = _RECIPE_HASH.findall(body)
    if not hashes:
        problems.append(f"{CARD_FILE_NAME} has no `recipe sha256` line, so it cannot be matched to {RECIPE_FILE_NAME}")
    elif hashes[0] != recipe_hash:
        problems.append(f"{CARD_FILE_NAME} describes another recipe (sha256 {hashes[0][:12]}…), "
                        f"but {RECIPE_FILE_NAME} hashes to {recipe_hash[:12]}…")
    if f"`{method}`" not in body:
        problems.append(f"{CARD_FILE_NAME} does not name the merge method `{method}`")
    if not re.search(rf"^- seed: {re.escape(str(seed))}$", body, re.MULTILINE):
        problems.append(f"{CARD_FILE_NAME} does not state the seed ({seed})")
    if "## Parameters as used" not in body:
        problems.append(f"{CARD_FILE_NAME} has no `## Parameters as used` section")
    inputs = tuple(CardInput(role, reference, revision.strip(), commit.strip())
                   for role, reference, revision, commit in _INPUT_ROW.findall(body))
    if not inputs:
        problems.append(f"{CARD_FILE_NAME} has no Inputs table (role, model, revision, commit)")
    for item in inputs:
        if not item.is_local and not _COMMIT.fullmatch(item.commit):
            problems.append(f"{CARD_FILE_NAME}: Hub input {item.reference} has no commit hash "
                            f"(found {item.commit or 'nothing'!r})")

    # 4. The front matter: base_model may only name Hub repos.
    base_models = metadata.get("base_model")
    listed = [base_models] if isinstance(base_models, str) else list(base_models or [])
    for entry in listed:
        reason = _not_a_hub_id(entry)
        if reason:
            problems.append(f"{CARD_FILE_NAME}: base_model lists {entry!r}, {reason}")
    if problems:
        _raise(folder, problems)

    added = _merge_front_matter(card.data, method=method, hub_inputs=[i.reference for i in inputs if not i.is_local])
    text = card.content if added else card_bytes.decode("utf-8")
    return PreparedCard(text=text, metadata=card.data.to_dict(), method=method, seed=seed,
                        recipe_sha256=recipe_hash, inputs=inputs, added=tuple(added))


def _merge_front_matter(data: Any, *, method: str, hub_inputs: list[str]) -> list[str]:
    """Add the merge's keys to the card's front matter where missing; return what was added.

    `data` is a huggingface_hub ModelCardData, changed in place. Keys and values already there win.
    """
    added = []
    tags = list(data.get("tags") or [])
    missing_tags = [tag for tag in (*REQUIRED_TAGS, method) if tag not in tags]
    if missing_tags:
        data["tags"] = tags + missing_tags
        added.append(f"tags {', '.join(missing_tags)}")

    base_models = data.get("base_model")
    listed = [base_models] if isinstance(base_models, str) else list(base_models or [])
    missing_inputs = [repo_id for repo_id in dict.fromkeys(hub_inputs) if repo_id not in listed]
    if missing_inputs:
        data["base_model"] = listed + missing_inputs
        listed = data["base_model"]
        added.append(f"base_model {', '.join(missing_inputs)}")
    if listed and data.get("base_model_relation") is None:
        data["base_model_relation"] = "merge"
        added.append("base_model_relation merge")
    if data.get("library_name") is None:
        data["library_name"] = "transformers"
        added.append("library_name transformers")
    return added


def _not_a_hub_id(entry: Any) -> str | None:
    """Say why `entry` cannot be a `base_model` value, or return None when it is a valid Hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(entry, str):
        return "which is not a string"
    try:
        validate_repo_id(entry)
    except HFValidationError:
        return "which is not a Hub repo id (a local path?); list local inputs in the card's body instead"
    if Path(entry).exists():
        return "which is a local path; list local inputs in the card's body instead"
    return None


def _read_bytes(path: Path, problems: list[str], *, missing: str) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(missing)
    except OSError as exc:
        problems.append(f"{path.name} cannot be read: {exc.strerror or exc}")
    return None


def _raise(folder: Path, problems: list[str]) -> NoReturn:
    header = f"the model card in {folder} cannot be published"
    lines = "\n".join(f"  - {problem}" for problem in problems)
    raise InputError(f"{header}:\n{lines}",
                     hint="run `merge run` again to rewrite the folder, or fix README.md; nothing was uploaded")
