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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.chunks import Chunk, ChunkScratch, TaskVectors
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.sparsify import (
    SIGN_ELECTIONS,
    MagnitudeMasks,
    MagnitudeSelection,
    check_sign_election,
    consensus_merge,
    keep_count,
)
from mergekit_plus.methods.task_arithmetic import LAMBDA, WEIGHT, normalize_param

SIGN_ELECTION = Param(
    "sign_election",
    str,
    "trimmed",
    'How the sign of each coordinate is elected: "trimmed" takes the sign of the sum of the '
    'sparsified task vectors (TIES paper), "weighted" the sign of their weighted sum (mergekit).',
    choices=SIGN_ELECTIONS,
)


class Trim:
    """The trim of one model's task vector: keep its k = floor(density · numel) largest magnitudes."""

    def __init__(self, density: float, numel: int, dtype: torch.dtype):
        self.k = keep_count(density, numel)
        self.selection = MagnitudeSelection(self.k, numel, dtype) if 0 < self.k < numel else None

    @property
    def ready(self) -> bool:
        """Whether the threshold is known, so that `apply` can run."""
        return self.selection is None or self.selection.done

    def masks(self) -> MagnitudeMasks | None:
        """Return a fresh mask maker for one pass, or None when the trim keeps all or nothing."""
        return self.selection.masks() if self.selection is not None else None

    def apply(self, delta: torch.Tensor, masks: MagnitudeMasks | None, scratch: ChunkScratch) -> None:
        """Zero the entries of one chunk of the task vector that the trim drops, in place."""
        if self.k == 0:
            delta.zero_()
        elif masks is not None:
            # A 0/1 mask in the delta's own dtype multiplies faster on CPU than a bool mask, and
            # both are faster than a masked fill.
            keep = scratch.get("keep", delta.dtype, delta.numel())
            delta.mul_(masks.next(delta, out=keep, scratch=scratch))


def find_thresholds(inputs: TaskVectors, trims: Sequence[Trim]) -> None:
    """Run the histogram passes over the task vectors until every trim's threshold is exact."""
    pending = [index for index, trim in enumerate(trims) if not trim.ready]
    while pending:
        for chunk in inputs.chunks(pending):
            for index, delta in zip(pending, chunk.deltas):
                trims[index].selection.count(delta, inputs.scratch)
        for index in pending:
            trims[index].selection.next_digit()
        pending = [index for index in pending if not trims[index].ready]


def trimmed_chunks(inputs: TaskVectors, trims: Sequence[Trim]) -> Iterator[Chunk]:
    """Yield every chunk of the task vectors with the trims applied, in flat order."""
    masks = [trim.masks() for trim in trims]
    for chunk in inputs.chunks():
        for trim, trim_masks, delta in zip(trims, masks, chunk.deltas):
            trim.apply(delta, trim_masks, inputs.scratch)
        yield chunk


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return θ₀ + λ · (disjoint merge of the trimmed task vectors). `seeds` is unused.

    The tensor is processed in chunks, so besides the result only a few chunk-sized buffers
    per model exist. It takes one histogram pass per digit of the trim thresholds (at most one
    for 16-bit floats, two for float32 and four for float64, see `MagnitudeSelection`), one
    pass to count the elected signs and one to merge.
    """
    if base is None:
        raise ValueError("ties needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    check_sign_election(params["sign_election"])
    weights = [mp["weight"] for mp in model_params]
    inputs = TaskVectors(base, tensors, compute_dtype)
    trims = [Trim(mp["density"], inputs.numel, compute_dtype) for mp in model_params]

    find_thresholds(inputs, trims)
    merged = consensus_merge(
        lambda: trimmed_chunks(inputs, trims),
        inputs.empty_output(),
        weights,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
        scale=params["lambda"],
        scratch=inputs.scratch,
    )
    return merged.view(inputs.shape)


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
