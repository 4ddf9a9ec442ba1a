"""Task arithmetic: add a weighted sum of task vectors to the base model.

Paper: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089.

Formula, per tensor, with base θ₀, models θ₁ … θ_T and task vectors τᵢ = θᵢ − θ₀:

    normalize false (default):  θ = θ₀ + λ · Σ wᵢ τᵢ
    normalize true:             θ = θ₀ + λ · Σ wᵢ τᵢ / Σ wᵢ

λ = 1/T with all weights 1 is the plain average of the models.

Parameters:
    weight (per model, default 1.0): the coefficient wᵢ of the model's task vector.
    lambda (default 1.0): scale of the merged task vector.
    normalize (default false): divide by Σ wᵢ. Weights that sum to zero with normalize on are
        rejected by `check` before any tensor is merged.

Not covered: choosing λ on validation data, which the paper does by a grid search. Tensors
whose shape differs from the base's are rejected, where mergekit would cut an embedding down to
the base's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.chunks import TaskVectors
from mergekit_plus.methods.linear import (
    check_weight_sum,
    validate_inputs,
    weights_sum_to_zero,
    zero_weight_sum_message,
)

WEIGHT = Param(
    "weight",
    float,
    1.0,
    "Coefficient of this model's task vector (its difference from the base).",
    per_model=True,
)
LAMBDA = Param(
    "lambda",
    float,
    1.0,
    "Scale of the merged task vector before it is added to the base.",
)


def normalize_param(default: bool) -> Param:
    """Return the `normalize` parameter of a method that sums weighted task vectors."""
    return Param(
        "normalize",
        bool,
        default,
        "Divide the weighted sum of task vectors by the sum of the weights.",
    )


def weighted_sum(deltas: Iterable[torch.Tensor], weights: Sequence[float], *, normalize: bool) -> torch.Tensor:
    """Return Σ wᵢ δᵢ, divided by Σ wᵢ when `normalize` is true.

    `deltas` may be a generator: each δᵢ is consumed before the next is made, so only one task
    vector is alive at a time. The δᵢ are scaled in place, so pass tensors you own.
    """
    if normalize and weights_sum_to_zero(weights):
        raise ValueError(zero_weight_sum_message(weights))
    merged: torch.Tensor | None = None
    for delta, weight in zip(deltas, weights):
        delta.mul_(weight)
        if merged is None:
            merged = delta
        else:
            merged.add_(delta)
    if merged is None:
        raise ValueError("the merge needs at least one task vector, got none")
    if normalize:
        merged.div_(math.fsum(weights))
    return merged


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return θ₀ + λ · Σ wᵢ (θᵢ − θ₀), divided by Σ wᵢ inside when `normalize` is true.

    Works chunk by chunk, so besides the result only one chunk per input exists in the compute
    dtype. `seeds` is unused.
    """
    if base is None:
        raise ValueError("task_arithmetic needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    weights = [mp["weight"] for mp in model_params]
    if params["normalize"] and weights_sum_to_zero(weights):
        raise ValueError(zero_weight_sum_message(weights))

    inputs = TaskVectors(base, tensors, compute_dtype)
    output = inputs.empty_output()
    for chunk in inputs.chunks():
        merged = weighted_sum(chunk.deltas, weights, normalize=params["normalize"])
        torch.add(merged.mul_(params["lambda"]), chunk.base, out=output[chunk.start : chunk.stop])
    return output.view(inputs.shape)


METHOD = MergeMethod(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089",
    summary="Adds the weighted sum of the models' differences from the base, scaled by lambda.",
    requires_base=True,
    operator=operator,
    params=(WEIGHT, LAMBDA, normalize_param(False)),
    check=check_weight_sum,
)
