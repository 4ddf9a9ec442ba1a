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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.chunks import Chunk, TaskVectors
from mergekit_plus.methods.linear import check_weight_sum, validate_inputs, weights_sum_to_zero, zero_weight_sum_message
from mergekit_plus.methods.sparsify import RandomKeepMasks, check_sign_election, consensus_merge, drop_and_rescale
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


def _task_vectors(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype,
) -> TaskVectors:
    """Validate the inputs and return their task vectors."""
    if base is None:
        raise ValueError(f"{method} needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    if len(seeds) != len(tensors):
        raise ValueError(f"{method} needs one seed per model: got {len(seeds)} seeds for {len(tensors)} models")
    return TaskVectors(base, tensors, compute_dtype)


def dropped_chunks(
    inputs: TaskVectors,
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    rescale: bool,
) -> Iterator[Chunk]:
    """Yield every chunk of the task vectors with each model's drop and rescale applied, in flat order.

    Each call draws the masks afresh from the seeds, so every pass gets the same masks.
    """
    densities = [mp["density"] for mp in model_params]
    masks = [
        RandomKeepMasks(inputs.numel, density, seed) if 0 < density < 1 else None
        for density, seed in zip(densities, seeds)
    ]
    for chunk in inputs.chunks():
        for delta, density, model_masks in zip(chunk.deltas, densities, masks):
            keep = None
            if model_masks is not None:
                keep = model_masks.next(delta.numel(), dtype=delta.dtype, device=delta.device)
            drop_and_rescale(delta, density, keep, rescale=rescale)
        yield chunk


def dare_linear_operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return θ₀ + λ · Σ wᵢ δᵢ (divided by Σ wᵢ inside when `normalize` is true), chunk by chunk."""
    inputs = _task_vectors("dare_linear", base, tensors, model_params, seeds, compute_dtype)
    weights = [mp["weight"] for mp in model_params]
    if params["normalize"] and weights_sum_to_zero(weights):
        raise ValueError(zero_weight_sum_message(weights))

    output = inputs.empty_output()
    for chunk in dropped_chunks(inputs, model_params, seeds, rescale=params["rescale"]):
        merged = weighted_sum(chunk.deltas, weights, normalize=params["normalize"])
        torch.add(merged.mul_(params["lambda"]), chunk.base, out=output[chunk.start : chunk.stop])
    return output.view(inputs.shape)


def dare_ties_operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return θ₀ + λ · (TIES sign election and disjoint merge of the dropped task vectors).

    The masks are drawn twice, once for the pass that counts the elected signs and once for
    the merge, so that no whole-tensor mask is kept.
    """
    inputs = _task_vectors("dare_ties", base, tensors, model_params, seeds, compute_dtype)
    check_sign_election(params["sign_election"])
    weights = [mp["weight"] for mp in model_params]
    merged = consensus_merge(
        lambda: dropped_chunks(inputs, model_params, seeds, rescale=params["rescale"]),
        inputs.empty_output(),
        weights,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
        scale=params["lambda"],
        scratch=inputs.scratch,
    )
    return merged.view(inputs.shape)


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
