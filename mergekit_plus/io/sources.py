"""Resolving a recipe's model reference to files on disk: a local folder, a single file, or a Hub repo."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergekit_plus.errors import InputError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Files a merge needs from a Hub repo: weights, configs and tokenizer files, no README images or ONNX.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_BIN_PATTERNS = ["*.json", "pytorch_model*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved input: the folder holding its files, and how it was named in the recipe.

    `weights_file` is set when the recipe named a single .safetensors file rather than a folder.
    `hub_id` and `commit` are set for inputs resolved from the Hugging Face Hub.
    """

    reference: str
    folder: Path
    weights_file: Path | None = None
    hub_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        if self.hub_id:
            return f"{self.hub_id}@{self.commit[:12]}" if self.commit else self.hub_id
        return self.reference


def split_revision(reference: str, revision: str | None) -> tuple[str, str | None]:
    """Split `org/name@rev` into its parts, unless `revision` is already given or the path exists."""
    if revision is None and "@" in reference and not Path(reference).exists():
        name, _, rev = reference.rpartition("@")
        if _HUB_ID.match(name):
            return name, rev
    return reference, revision


def looks_like_hub_id(reference: str) -> bool:
    return bool(_HUB_ID.match(reference)) and not reference.startswith((".", "/", "~"))


def resolve_source(reference: str, revision: str | None = None) -> ModelSource:
    """Find the files of one input. Raise InputError when they cannot be found."""
    reference, revision = split_revision(reference, revision)
    path = Path(reference).expanduser()
    if path.exists():
        if revision is not None:
            raise InputError(f"model {reference}: `revision: {revision}` was given for a local path",
                             hint="remove `revision`, or name a Hub repo id instead of a local path")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise InputError(f"model {reference}: a single-file input must be a .safetensors file",
                                 hint="name the folder that holds the checkpoint instead")
            return ModelSource(reference=reference, folder=path.parent, weights_file=path)
        return ModelSource(reference=reference, folder=path)
    if looks_like_hub_id(reference):
        return _resolve_hub(reference, revision)
    raise InputError(f"model {reference}: no such file or folder, and it is not a Hub repo id (org/name)",
                     hint="check the path; relative paths are resolved from the current folder")


def _resolve_hub(repo_id: str, revision: str | None) -> ModelSource:
    # Imported here so that local-only merges do not pay for importing the Hub client.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_BIN_PATTERNS))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        where = "downloads are off (HF_HUB_OFFLINE is set)" if offline else "the Hub could not be reached"
        hint = (f"if it is a local path, check it (relative paths start from {Path.cwd()}); "
                f"if it is a Hub repo, download it first with `hf download {repo_id}`"
                + (" or unset HF_HUB_OFFLINE" if offline else ""))
        raise InputError(f"model {label}: no such local file or folder, and not in the Hugging Face cache; {where}",
                         hint=hint) from exc
    except GatedRepoError as exc:
        raise InputError(f"model {label}: the repo is gated and this token has no access",
                         hint="accept the model's terms on the Hub and set HF_TOKEN") from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"model {label}: revision {revision!r} not found",
                         hint="check the branch, tag or commit name") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(f"model {label}: repo not found on the Hub (or it is private)",
                         hint="check the repo id, or set HF_TOKEN for a private repo") from exc

    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    logger.info("resolved %s to %s", label, folder)
    return ModelSource(reference=repo_id, folder=folder, hub_id=repo_id, revision=revision, commit=commit)
