"""The recipe schema. Unknown keys are errors; see docs/recipe.md for the meaning of each key."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Parse a byte count such as 5000000, "500MB" or "2GiB". Raise ValueError if invalid."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 2GB, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 500MB or 2GB, got {value!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def normalize_dtype_name(value: str) -> str:
    """Map a dtype spelling (`bf16`, `torch.float16`, ...) to its canonical name, or raise ValueError."""
    name = str(value).strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One input model: where it is, and its per-model method parameters."""

    model: str
    revision: str | None = None
    task: str | None = None
    """The task whose `data:` entry belongs to this model; default: the folder name less `ft-`."""
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _empty_parameters(cls, value: Any) -> Any:
        return {} if value is None else value


class BaseModelSpec(_Strict):
    """The base (pretrained) model, written as a string or as {model, revision}."""

    model: str
    revision: str | None = None


class OutputSpec(_Strict):
    path: str | None = None
    shard_size: int | str = "5GB"
    overwrite: bool = False
    clamp_out_of_range: bool = False

    @field_validator("shard_size")
    @classmethod
    def _check_size(cls, value: int | str) -> int | str:
        parse_size(value)
        return value


class TokenizerSpec(_Strict):
    """The tokenizer source, and the rule that matches embedding rows of different vocabularies.

    `vocab: strict` requires equal vocabulary tensors. `vocab: align` matches rows by token string to
    the source's vocabulary; a row that some inputs lack is merged from the inputs that have it.
    """

    source: str = "base"
    vocab: Literal["strict", "align"] = "strict"


class DataSpec(_Strict):
    """One task's data for methods that learn: prompts (unlabelled) or prompt/answer pairs (labelled)."""

    path: str
    samples: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=64, gt=0)


class Recipe(_Strict):
    """A validated recipe. Field names follow mergekit where the meaning is the same."""

    merge_method: str
    base_model: BaseModelSpec | None = None
    models: list[ModelSpec]
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    output: OutputSpec = Field(default_factory=OutputSpec)
    tokenizer: TokenizerSpec | None = None
    tokenizer_source: str | None = None
    data: dict[str, DataSpec] | None = None

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_from_string(cls, value: Any) -> Any:
        return {"model": value} if isinstance(value, str) else value

    @field_validator("parameters", mode="before")
    @classmethod
    def _empty_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        return normalize_dtype_name(value)

    @field_validator("out_dtype")
    @classmethod
    def _check_out_dtype(cls, value: str | None) -> str | None:
        return None if value is None else normalize_dtype_name(value)

    @property
    def tokenizer_source_name(self) -> str:
        """The tokenizer source as written: `base`, or a model reference from `models`."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source or "base"

    @property
    def vocab_policy(self) -> str:
        return self.tokenizer.vocab if self.tokenizer is not None else "strict"

    @property
    def shard_size_bytes(self) -> int:
        return parse_size(self.output.shard_size)


# Keys valid at each level, for "did you mean" and "belongs elsewhere" hints.
TOP_LEVEL_KEYS = tuple(Recipe.model_fields)
MODEL_KEYS = tuple(ModelSpec.model_fields)
OUTPUT_KEYS = tuple(OutputSpec.model_fields)
TOKENIZER_KEYS = tuple(TokenizerSpec.model_fields)
DATA_KEYS = tuple(DataSpec.model_fields)

# mergekit keys we do not support, with the reason, so the error explains more than "unknown key".
UNSUPPORTED_MERGEKIT_KEYS = {
    "slices": "layer slicing (passthrough/frankenmerges) is not supported; list whole models under `models`",
    "chat_template": "set the chat template through the tokenizer source's tokenizer_config.json",
    "modules": "per-module recipes are not supported; use parameter filters instead",
}
