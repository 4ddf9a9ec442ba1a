"""The meaning of tensor names: layer index, role (embedding, head), tied weights. Reads no tensor data."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from mergekit_plus.recipe.params import LayerPosition

# The container of the repeated blocks in the families we support: Llama/Mistral/Qwen/Gemma
# (`model.layers.N.`), GPT-2 (`transformer.h.N.`), BERT (`encoder.layer.N.`), ViT/CLIP
# (`encoder.layers.N.`, `resblocks.N.`), GPT-NeoX (`gpt_neox.layers.N.`).
_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|resblocks)\.(\d+)\.")

# Input embeddings and output heads: the tensors whose first dimension is the vocabulary.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                       "shared.weight", "tok_embeddings.weight")
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
# A final norm sits at the top level of the model, not inside a block.
_FINAL_NORM_PATTERN = re.compile(r"(^|\.)(ln_f|final_layer_norm|final_layernorm|norm)\.")


def layer_index(tensor_name: str) -> int | None:
    """Return the block index of a tensor inside the repeated layers, or None outside them."""
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def is_vocab_tensor(tensor_name: str) -> bool:
    """True for input embeddings and output heads, whose first dimension is the vocabulary size."""
    return tensor_name.endswith(_EMBEDDING_SUFFIXES) or tensor_name in _HEAD_NAMES


def is_head(tensor_name: str) -> bool:
    return tensor_name in _HEAD_NAMES


def count_layers(config: Mapping[str, Any] | None, tensor_names: Iterable[str]) -> int:
    """Return the number of blocks: from the config when it has the count, else from the tensor names."""
    if config:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        text_config = config.get("text_config")
        if isinstance(text_config, Mapping):
            return count_layers(text_config, tensor_names)
    indices = [index for index in map(layer_index, tensor_names) if index is not None]
    return max(indices) + 1 if indices else 0


def architecture_name(config: Mapping[str, Any] | None) -> str:
    """Name a model's architecture for messages: its config's `architectures`, else its `model_type`."""
    if config:
        names = config.get("architectures")
        if isinstance(names, list) and names:
            return ", ".join(str(name) for name in names)
        if config.get("model_type"):
            return str(config["model_type"])
    return "an architecture without config.json"


def find_block_problems(config: Mapping[str, Any] | None, tensor_names: Iterable[str]) -> list[str]:
    """Return why the tensors cannot be placed in the model's blocks, as sentences, or nothing when they can.

    A method that scales by depth needs every block tensor's index to lie below the block count.
    """
    names = list(tensor_names)
    indexed = [(name, index) for name in names if (index := layer_index(name)) is not None]
    where = architecture_name(config)
    if not indexed:
        return [f"no tensor of {where} lies in a stack of repeated blocks: none of its names contains "
                "`layers.N.`, `h.N.`, `layer.N.`, `blocks.N.` or `resblocks.N.`"]
    count = count_layers(config, names)
    name, index = max(indexed, key=lambda pair: pair[1])
    if index >= count:
        return [f"tensor {name} of {where} lies in block {index}, but the config counts {count} blocks"]
    return []


def layer_position(tensor_name: str, num_layers: int) -> LayerPosition:
    """Place a tensor along the depth: blocks by index, others before (0.0) or after (1.0) them."""
    index = layer_index(tensor_name)
    if index is None or num_layers <= 0:
        return LayerPosition(1.0 if is_after_layers(tensor_name) else 0.0)
    if num_layers == 1:
        return LayerPosition(0.0)
    return LayerPosition(min(index, num_layers - 1) / (num_layers - 1))


def is_after_layers(tensor_name: str) -> bool:
    """True for non-block tensors that run after the blocks: heads and the final norm.

    Order in a checkpoint is not reliable, so this goes by name.
    """
    if layer_index(tensor_name) is not None:
        return False
    return is_head(tensor_name) or _FINAL_NORM_PATTERN.search(tensor_name + ".") is not None


def ties_word_embeddings(config: Mapping[str, Any] | None) -> bool:
    """Return whether the config ties the output head to the input embedding.

    transformers' own default is True when the key is absent.
    """
    if not config:
        return False
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text_config = config.get("text_config")
    if isinstance(text_config, Mapping) and "tie_word_embeddings" in text_config:
        return bool(text_config["tie_word_embeddings"])
    return True


def tied_head_names(config: Mapping[str, Any] | None, tensor_names: Iterable[str]) -> set[str]:
    """Heads that transformers rebuilds from the embedding at load time, so the output must not store them."""
    if not ties_word_embeddings(config):
        return set()
    has_embedding = any(name.endswith(_EMBEDDING_SUFFIXES) for name in tensor_names)
    return set(_HEAD_NAMES) if has_embedding else set()


def sort_key(tensor_name: str) -> tuple[int, int, str]:
    """Order tensors as a model runs: before the blocks, block by block, then after them."""
    index = layer_index(tensor_name)
    if index is not None:
        return (1, index, tensor_name)
    if is_after_layers(tensor_name):
        return (2, 0, tensor_name)
    return (0, 0, tensor_name)
