"""Per-tensor parameter resolution: filter lists, layer gradients, and the precedence between levels.

Precedence, highest first: the model's own `parameters`, the recipe's top-level `parameters`, the
method's default. A filter list where no entry matches a tensor falls through to the next level.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_plus.methods.base import MergeMethod, Param

_GLOB_CHARS = set("*?[")
_UNSET = object()


@dataclass(frozen=True)
class LayerPosition:
    """The position of a tensor along the depth of the model, for gradients.

    `fraction` is 0.0 for tensors before the first layer (embeddings), layer_index / (num_layers - 1)
    inside the layers, and 1.0 after the last layer (final norm, head).
    """

    fraction: float


def filter_matches(pattern: str, tensor_name: str) -> bool:
    """Match a filter against a tensor name: as a glob when it contains *, ? or [, else as a substring."""
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(tensor_name, pattern)
    return pattern in tensor_name


def interpolate_gradient(values: Sequence[float], fraction: float) -> float:
    """Interpolate linearly in `values`, spread evenly over [0, 1], at `fraction`."""
    if len(values) == 1:
        return float(values[0])
    position = min(max(fraction, 0.0), 1.0) * (len(values) - 1)
    low = int(position)
    if low >= len(values) - 1:
        return float(values[-1])
    weight = position - low
    return float(values[low]) * (1.0 - weight) + float(values[low + 1]) * weight


def evaluate_value(value: Any, tensor_name: str, position: LayerPosition) -> Any:
    """Evaluate one recipe value for one tensor; return _UNSET when a filter list has no match."""
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            for entry in value:
                pattern = entry.get("filter")
                if pattern is None or filter_matches(pattern, tensor_name):
                    return evaluate_value(entry["value"], tensor_name, position)
            return _UNSET
        return interpolate_gradient(value, position.fraction)
    return value


def _coerce(param: Param, value: Any) -> Any:
    if param.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def resolve_parameter(param: Param, levels: Sequence[Mapping[str, Any]], tensor_name: str,
                      position: LayerPosition) -> Any:
    """Return the value of `param` for one tensor, looking through `levels` from highest precedence."""
    for level in levels:
        if param.name in level:
            value = evaluate_value(level[param.name], tensor_name, position)
            if value is not _UNSET:
                return _coerce(param, value)
    return param.default


def resolve_tensor_parameters(
    method: MergeMethod,
    global_values: Mapping[str, Any],
    per_model_values: Sequence[Mapping[str, Any]],
    tensor_name: str,
    position: LayerPosition,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resolve every parameter of `method` for one tensor.

    Returns the global parameters and one mapping of per-model parameters for each model.
    """
    params = {p.name: resolve_parameter(p, [global_values], tensor_name, position) for p in method.global_params}
    model_params = [
        {p.name: resolve_parameter(p, [own, global_values], tensor_name, position) for p in method.model_params}
        for own in per_model_values
    ]
    return params, model_params
