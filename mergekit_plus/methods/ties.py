"""TIES-Merging: trim task vectors, elect a sign per coordinate, merge the agreeing models.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
arXiv:2306.01708.

Steps, per tensor, with base θ₀ and models θ₁ … θ_T:

1. Task vectors: τᵢ = θᵢ − θ₀.
2. Trim: τ̂ᵢ keeps the k = floor(densityᵢ · numel) entries of τᵢ with the largest |τᵢ| and sets
   the rest to 0. Ties at the threshold keep the lowest flat indices, so exactly k entries stay.
3. Elect: γ = sign(Σ τ̂ᵢ) ("trimmed", the paper's rule and the default) or sign(Σ wᵢ τ̂ᵢ)
   ("weighted", mergekit's rule). Where the sum is exactly 0, γ is the sign of Σ γ over the
   tensor (the majority of the elected signs), and + when that is 0 too.
4. Disjoint merge: A = {i : sign(τ̂ᵢ) = γ and τ̂ᵢ ≠ 0} at each coordinate, and
   m = Σ_{i∈A} wᵢ τ̂ᵢ / Σ_{i∈A} wᵢ with normalize (0 where that divisor is 0), or
   m = Σ_{i∈A} wᵢ τ̂ᵢ without.
5. θ = θ₀ + λ · m.

With all weights 1, normalize true is the paper's "dis-mean" and normalize false its "dis-sum".

Parameters:
    weight (per model, default 1.0): coefficient wᵢ in the disjoint merge (and in the
        election when sign_election is "weighted").
    density (per model, default 0.2, in [0, 1]): fraction of each task vector's entries kept by
        the trim. 1 keeps all; a density with density · numel < 1 keeps none, and the tensor
        then comes out equal to the base.
    lambda (default 1.0): scale of the merged task vector.
    normalize (default true): divide by the sum of the agreeing models' weights.
    sign_election (default "trimmed"): "trimmed" or "weighted", see step 3.

Not covered: the trim over the whole flattened model of the paper's code, because this trim
works per tensor, as mergekit's does. That code's keep count of floor(k·d)+1, its "dis-max"
merge and its "normfrac" and "normmass" elections are not implemented either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.sparsify import SIGN_ELECTIONS, disjoint_merge, keep_count, magnitude_mask
from mergekit_plus.methods.task_arithmetic import LAMBDA, WEIGHT, normalize_param

SIGN_ELECTION = Param(
    "sign_election",
    str,
    "trimmed",
    'How the sign of each coordinate is elected: "trimmed" takes the sign of the sum of the '
    'sparsified task vectors (TIES paper), "weighted" the sign of their weighted sum (mergekit).',
    choices=SIGN_ELECTIONS,
)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the floor(density · numel) largest-magnitude entries of `delta`, in place."""
    k = keep_count(density, delta.numel())
    if k == 0:
        return delta.zero_()
    if k < delta.numel():
        # Multiplying by the mask is faster on CPU than a masked fill.
        delta.mul_(magnitude_mask(delta, k))
    return delta


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
) -> torch.Tensor:
    """Return θ₀ + λ · (disjoint merge of the trimmed task vectors). `seeds` is unused."""
    if base is None:
        raise ValueError("ties needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    weights = [mp["weight"] for mp in model_params]

    trimmed = [trim(tensor - base, mp["density"]) for tensor, mp in zip(tensors, model_params)]
    merged = disjoint_merge(
        trimmed,
        weights,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
    )
    del trimmed
    return merged.mul_(params["lambda"]).add_(base)


METHOD = MergeMethod(
    name="ties",
    title="TIES-Merging",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv:2306.01708",
    summary="Keeps each task vector's largest entries, elects a sign per entry, and averages the agreeing models.",
    requires_base=True,
    operator=operator,
    params=(
        WEIGHT,
        Param(
            "density",
            float,
            0.2,
            "Fraction of this model's task-vector entries kept by the trim, largest magnitudes first.",
            per_model=True,
            minimum=0.0,
            maximum=1.0,
        ),
        LAMBDA,
        normalize_param(True),
        SIGN_ELECTION,
    ),
)
