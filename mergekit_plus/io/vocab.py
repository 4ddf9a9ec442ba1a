"""Reading a checkpoint's vocabulary (token string to id) from its tokenizer files, without transformers."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_plus.errors import InputError
from mergekit_plus.io.sources import ModelSource


def read_vocabulary(source: ModelSource) -> dict[str, int]:
    """Return the token-to-id map of `source`: tokenizer.json first, then vocab.json or vocab.txt.

    Added tokens (tokenizer.json `added_tokens`, or added_tokens.json) are included.
    Raise InputError when no vocabulary file is found.
    """
    folder = source.folder
    vocabulary: dict[str, int] | None = None
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        vocabulary = _from_tokenizer_json(tokenizer_file)
    elif (folder / "vocab.json").is_file():
        vocabulary = _load_json(folder / "vocab.json")
    elif (folder / "vocab.txt").is_file():
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocabulary = {token: index for index, token in enumerate(lines)}
    if vocabulary is None:
        raise InputError(f"model {source.label}: no tokenizer.json, vocab.json or vocab.txt in {folder}, so its "
                         "embedding rows cannot be matched by token",
                         hint="add the tokenizer files to that checkpoint")
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        vocabulary.update(_load_json(added_file))
    return vocabulary


def _from_tokenizer_json(path: Path) -> dict[str, int]:
    data = _load_json(path)
    model = data.get("model") or {}
    raw = model.get("vocab")
    vocabulary: dict[str, int] = {}
    if isinstance(raw, dict):
        vocabulary = {str(token): int(index) for token, index in raw.items()}
    elif isinstance(raw, list):  # Unigram: a list of [token, score] in id order
        vocabulary = {str(entry[0]): index for index, entry in enumerate(raw)}
    for added in data.get("added_tokens") or []:
        vocabulary[str(added["content"])] = int(added["id"])
    return vocabulary


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as JSON ({exc})", hint="download the tokenizer files again") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object", hint="download the tokenizer files again")
    return data
