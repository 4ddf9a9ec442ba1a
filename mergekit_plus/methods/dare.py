"""DARE (Drop And REscale) followed by task arithmetic (dare_linear) or by the TIES merge (dare_ties).

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as
a Free Lunch", ICML 2024, arXiv:2311.03099.

Steps, per tensor, with base θ₀ and models θ₁ … θ_T:

1. Task vectors: τᵢ = θᵢ − θ₀.
2. Drop: mᵢ ~ Bernoulli(densityᵢ) element-wise, drawn from a CPU generator seeded with seedᵢ.
   δᵢ = mᵢ ⊙ τᵢ / densityᵢ with rescale (so that E[δᵢ] = τᵢ), or mᵢ ⊙ τᵢ without.
   density 1 keeps every entry; density 0 gives δᵢ = 0 (no 0/0).
3. Merge:
   - dare_linear: θ = θ₀ + λ · Σ wᵢ δᵢ, divided by Σ wᵢ inside when normalize is true.
   - dare_ties: the sign election and disjoint merge of TIES on the δᵢ, without the TIES magnitude
     trim: γ = sign(Σ δᵢ) ("trimmed") or sign(Σ wᵢ δᵢ) ("weighted"), A = {i : sign(δᵢ) = γ, δᵢ ≠ 0},
     m = Σ_{i∈A} wᵢ δᵢ / Σ_{i∈A} wᵢ with normalize (0 where that divisor is 0), else Σ_{i∈A} wᵢ δᵢ;
     θ = θ₀ + λ · m.

The paper's parameter is the drop rate p; here density = 1 − p is the keep probability.

Parameters:
    weight (per model, default 1.0): coefficient wᵢ of the model's dropped task vector.
    density (per model, default 0.5, in [0, 1]): probability that an entry of the task vector is kept.
    lambda (default 1.0): scale of the merged task vector.
    normalize (default false for dare_linear, true for dare_ties): divide by the sum of the
        weights (dare_linear) or of the agreeing models' weights (dare_ties).
    rescale (default true): divide the kept entries by density.
    sign_election (dare_ties only, default "trimmed"): "trimmed" elects from the unweighted δᵢ,
        "weighted" from wᵢ δᵢ.

Each model's mask depends only on its seed, the tensor's shape and the density, on every
device. A merge is therefore byte-identical across runs, thread counts and tensor orders, and
another seed gives another mask.

Not covered: dropping by magnitude instead of at random (an ablation in the paper), mergekit's
newer rescaling to the tensor's L1 norm, and the magnitude trim that the DARE authors' code runs
after the drop for DARE+TIES.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.linear import check_weight_sum, validate_inputs
from mergekit_plus.methods.sparsify import disjoint_merge, drop_and_rescale
from mergekit_plus.methods.task_arithmetic import LAMBDA, WEIGHT, normalize_param, weighted_sum
from mergekit_plus.methods.ties import SIGN_ELECTION

DENSITY = Param(
    "density",
    float,
    0.5,
    "Probability that an entry of this model's task vector is kept (1 minus the drop rate).",
    per_model=True,
    minimum=0.0,
    maximum=1.0,
)
RESCALE = Param(
    "rescale",
    bool,
    True,
    "Divide the kept entries by density, so the dropped task vector keeps its expected value.",
)


def _dropped_deltas(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
):
    """Validate the inputs and yield each model's dropped and rescaled task vector, one at a time."""
    if base is None:
        raise ValueError(f"{method} needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    if len(seeds) != len(tensors):
        raise ValueError(f"{method} needs one seed per model: got {len(seeds)} seeds for {len(tensors)} models")
    for tensor, mp, seed in zip(tensors, model_params, seeds):
        yield drop_and_rescale(tensor - base, mp["density"], seed, rescale=params["rescale"])


def dare_linear_operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
) -> torch.Tensor:
    """Return θ₀ + λ · Σ wᵢ δᵢ (divided by Σ wᵢ inside when `normalize` is true)."""
    weights = [mp["weight"] for mp in model_params]
    deltas = _dropped_deltas("dare_linear", base, tensors, params, model_params, seeds)
    merged = weighted_sum(deltas, weights, normalize=params["normalize"])
    return merged.mul_(params["lambda"]).add_(base)


def dare_ties_operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
) -> torch.Tensor:
    """Return θ₀ + λ · (TIES sign election and disjoint merge of the dropped task vectors)."""
    weights = [mp["weight"] for mp in model_params]
    deltas = list(_dropped_deltas("dare_ties", base, tensors, params, model_params, seeds))
    merged = disjoint_merge(
        deltas,
        weights,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
    )
    del deltas
    return merged.mul_(params["lambda"]).add_(base)


_PAPER = (
    "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models "
    "as a Free Lunch, ICML 2024, arXiv:2311.03099"
)

DARE_LINEAR = MergeMethod(
    name="dare_linear",
    title="DARE + task arithmetic",
    paper=_PAPER,
    summary="Drops task-vector entries at random, rescales the rest by 1/density, and adds their weighted sum.",
    requires_base=True,
    operator=dare_linear_operator,
    params=(WEIGHT, DENSITY, LAMBDA, normalize_param(False), RESCALE),
    check=check_weight_sum,
    randomized=True,
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    title="DARE + TIES sign consensus",
    paper=_PAPER,
    summary="Drops task-vector entries at random, rescales the rest, then elects signs and averages agreeing models.",
    requires_base=True,
    operator=dare_ties_operator,
    params=(WEIGHT, DENSITY, LAMBDA, normalize_param(True), RESCALE, SIGN_ELECTION),
    randomized=True,
)
