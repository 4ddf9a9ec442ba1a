"""Linear merge: a weighted average of the input models.

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, arXiv:2203.05482.

Formula, per tensor, for input models θ₁ … θ_T with weights w₁ … w_T:

    normalize true (default):  θ = Σ wᵢ θᵢ / Σ wᵢ
    normalize false:           θ = Σ wᵢ θᵢ

Parameters:
    weight (per model, default 1.0): the model's coefficient wᵢ. Negative values are allowed.
    normalize (default true): divide by Σ wᵢ. A recipe whose weights sum to zero with
        normalize on is rejected by `check` before any tensor is merged.

Not covered: a base model, spherical interpolation, and tensors whose shapes differ between
models. The method uses no base, so give every model a weight instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.chunks import ChunkScratch, chunk_bounds, flatten, to_compute_dtype


def weights_sum_to_zero(weights: Sequence[float]) -> bool:
    """Return whether the weights sum to zero, up to floating-point rounding.

    The sum is exact (`math.fsum`) and counts as zero when it is below 1e-9 of Σ|wᵢ|, so that
    weights such as 0.1, 0.2, -0.3 count as summing to zero although their doubles do not.
    """
    total = math.fsum(weights)
    return abs(total) <= 1e-9 * math.fsum(abs(w) for w in weights)


def zero_weight_sum_message(weights: Sequence[float]) -> str:
    """Describe a zero weight sum with normalize on, and how to fix it."""
    listed = ", ".join(f"{w:g}" for w in weights)
    return (
        f"the weights [{listed}] sum to 0 and `normalize: true` divides by that sum; "
        "change the weights so they do not sum to 0, or set `normalize: false`"
    )


def check_weight_sum(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Report a zero weight sum when `normalize` is on. Shared by every method that divides by Σ wᵢ."""
    weights = [mp["weight"] for mp in model_params]
    if params["normalize"] and weights and weights_sum_to_zero(weights):
        return [zero_weight_sum_message(weights)]
    return []


def validate_inputs(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[Mapping[str, Any]],
) -> None:
    """Raise ValueError unless there is at least one model, one parameter set per model, and one shape."""
    if not tensors:
        raise ValueError("the merge needs at least one input tensor, got none")
    if len(model_params) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors but {len(model_params)} sets of per-model parameters")
    shape = tensors[0].shape if base is None else base.shape
    for index, tensor in enumerate(tensors):
        if tensor.shape != shape:
            raise ValueError(f"model {index} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return Σ wᵢ θᵢ, divided by Σ wᵢ when `normalize` is true. `base` and `seeds` are unused.

    Works chunk by chunk, converting one input chunk at a time to the compute dtype.
    """
    validate_inputs(None, tensors, model_params)
    weights = [mp["weight"] for mp in model_params]
    if params["normalize"] and weights_sum_to_zero(weights):
        raise ValueError(zero_weight_sum_message(weights))

    flat = [flatten(tensor) for tensor in tensors]
    numel = flat[0].numel()
    output = torch.empty(numel, dtype=compute_dtype, device=tensors[0].device)
    scratch = ChunkScratch(numel, tensors[0].device)
    for start, stop in chunk_bounds(numel):
        buffer = scratch.get("product", compute_dtype, stop - start)
        first = to_compute_dtype(flat[0][start:stop], compute_dtype, buffer)
        merged = torch.mul(first, weights[0], out=output[start:stop])
        for tensor, weight in zip(flat[1:], weights[1:]):
            converted = to_compute_dtype(tensor[start:stop], compute_dtype, buffer)
            merged.add_(torch.mul(converted, weight, out=buffer))
        if params["normalize"]:
            merged.div_(math.fsum(weights))
    return output.view(tensors[0].shape)


METHOD = MergeMethod(
    name="linear",
    title="Linear (weighted average)",
    paper="Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
    summary="Weighted average of the input models; no base model.",
    requires_base=False,
    operator=operator,
    params=(
        Param(
            "weight",
            float,
            1.0,
            "Coefficient of this model in the weighted sum.",
            per_model=True,
        ),
        Param(
            "normalize",
            bool,
            True,
            "Divide the weighted sum by the sum of the weights, so the weights act as proportions.",
        ),
    ),
    check=check_weight_sum,
)
