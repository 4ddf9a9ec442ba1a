"""TIES-Merging: trim task vectors, elect a sign per coordinate, merge the agreeing models.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
arXiv:2306.01708.

Steps, with base θ₀ and models θ₁ … θ_T:

1. Task vectors: τᵢ = θᵢ − θ₀.
2. Trim, with `scope: model` (the default, the paper's rule): flatten every merged tensor of τᵢ
   into one vector of d entries, let q be its (d − floor(densityᵢ · d))-th smallest |τᵢ| and keep
   the entries with |τᵢ| ≥ q: floor(densityᵢ · d) + 1 entries plus the ties at q. The executor
   finds q in statistics passes before the merge (`TrimThresholds`). Density 0 keeps nothing.
   With `scope: tensor` (mergekit's rule): per tensor, τ̂ᵢ keeps the k = floor(densityᵢ · numel)
   entries of τᵢ with the largest |τᵢ| and sets the rest to 0. Ties at the threshold keep the
   lowest flat indices, so exactly k entries stay.
3. Elect: γ = sign(Σ τ̂ᵢ) ("trimmed", the paper's rule and the default) or sign(Σ wᵢ τ̂ᵢ)
   ("weighted", mergekit's rule). Where the sum is exactly 0, γ is the sign of Σ γ (the majority
   of the elected signs), and + when that is 0 too. With `scope: model` that majority is taken
   over the whole model, as the paper's code does, in one more statistics pass (`TiesStatistics`).
   With `scope: tensor` it is taken over the tensor.
4. Disjoint merge: A = {i : sign(τ̂ᵢ) = γ and τ̂ᵢ ≠ 0} at each coordinate, and
   m = Σ_{i∈A} wᵢ τ̂ᵢ / Σ_{i∈A} wᵢ with normalize (0 where that divisor is 0), or
   m = Σ_{i∈A} wᵢ τ̂ᵢ without.
5. θ = θ₀ + λ · m.

With all weights 1, normalize true is the paper's "dis-mean" and normalize false its "dis-sum".

Parameters:
    weight (per model, default 1.0): coefficient wᵢ in the disjoint merge (and in the
        election when sign_election is "weighted").
    density (per model, default 0.2, in [0, 1]): fraction of each task vector's entries kept by
        the trim. 1 keeps all. With `scope: tensor`, a density with density · numel < 1 keeps
        none, and the tensor then comes out equal to the base. With `scope: model` it may differ
        between models but not between the tensors of one model.
    lambda (default 1.0): scale of the merged task vector.
    normalize (default true): divide by the sum of the agreeing models' weights.
    sign_election (default "trimmed"): "trimmed" or "weighted", see step 3.
    scope (default "model"): "model" or "tensor", see step 2. It must be the same for every tensor.

Not covered: where the whole-model majority is a tie too, the paper's code leaves γ at 0 and so
keeps the negative entries. Here γ is + there. That code's "dis-max" merge and its "normfrac"
and "normmass" elections are not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, MergeTarget, ModelStatistics, Param, varying_param_problem
from mergekit_plus.methods.chunks import Chunk, ChunkScratch, TaskVectors
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.sparsify import (
    SELECTION_HISTOGRAM_BYTES,
    SIGN_ELECTIONS,
    MagnitudeMasks,
    MagnitudeSelection,
    check_sign_election,
    consensus_merge,
    elected_sign_balance,
    keep_count,
    majority_sign,
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

SCOPES = ("model", "tensor")
"""Choices of the `scope` parameter: where the trim ranks a task vector's entries."""

SCOPE = Param(
    "scope",
    str,
    "model",
    'Where the trim ranks each task vector\'s entries: "model" over the whole model flattened into '
    "one vector (TIES paper), which reads the inputs two or three more times before merging in float32; "
    '"tensor" within each tensor (mergekit). One value for the whole merge.',
    choices=SCOPES,
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


@dataclass(frozen=True)
class ModelThreshold:
    """The trim of one task vector over the whole model, as the statistics passes found it."""

    numel: int
    """Entries of the task vector over every merged tensor (d)."""
    kept_count: int
    """Entries that the trim keeps: floor(density · d) + 1 plus the ties at the threshold, all of
    them, or none."""
    minimum_key: int | None
    """The `magnitude_keys` value at and above which entries are kept, in the compute dtype's bits.
    None when the trim keeps every entry or none."""

    def describe(self, dtype: torch.dtype) -> str:
        """Describe the trim in words, with `minimum_key` as a number of `dtype`.

        That number may lie below q when no |τ| falls between the two, so it bounds the kept
        entries without being one of them.
        """
        if self.minimum_key is None:
            return f"the trim keeps {self.kept_count:,} of {self.numel:,} task-vector entries"
        bits = torch.tensor([self.minimum_key], dtype=_key_dtype(dtype))
        threshold = float(bits.view(dtype)[0])
        return (f"the trim keeps {self.kept_count:,} of {self.numel:,} task-vector entries "
                f"({self.kept_count / self.numel:.2%}), those with |τ| ≥ {threshold:.6g}")


def _key_dtype(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


class ThresholdTrim:
    """The trim of one model's task vector in one tensor at a threshold found over the whole model.

    It has the interface of `Trim`, and it is always ready: no pass over the tensor is needed.
    """

    ready = True

    def __init__(self, threshold: ModelThreshold):
        self.threshold = threshold

    def masks(self) -> MagnitudeMasks | None:
        """Return a mask maker that keeps the keys at or above the threshold, or None when the trim keeps all or nothing."""
        key = self.threshold.minimum_key
        # With no ties left to count, the masks keep every key at or above `key`.
        return MagnitudeMasks(key, 0, 0) if key is not None else None

    def apply(self, delta: torch.Tensor, masks: MagnitudeMasks | None, scratch: ChunkScratch) -> None:
        """Zero the entries of one chunk of the task vector that the trim drops, in place."""
        if self.threshold.kept_count == 0:
            delta.zero_()
        elif masks is not None:
            keep = scratch.get("keep", delta.dtype, delta.numel())
            delta.mul_(masks.next(delta, out=keep, scratch=scratch))


class TrimThresholds(ModelStatistics):
    """Finds, for each model, the trim threshold q of its task vector over the whole model.

    Every chunk of every merged tensor of the task vector, converted to the compute dtype, goes
    into one `MagnitudeSelection` per model. The first pass histograms the top 16 bits of the
    keys, without the sign bit. For float32, a second pass histograms the low 16 bits of the keys
    inside the bin that contains the threshold, unless the first pass already settles it. The
    selection looks for the (floor(density · d) + 1)-th largest |τ|, which is the
    (d − floor(density · d))-th smallest, so q is exact.
    """

    purpose = "the trim threshold of each task vector over the whole model"

    def __init__(self, densities: Sequence[float], numels: Sequence[int], compute_dtype: torch.dtype):
        self.compute_dtype = compute_dtype
        self.numels = tuple(numels)
        self._passes = 0
        self._counted = [0] * len(self.numels)
        self._kept_without_selection: list[int | None] = []
        self._selections: list[MagnitudeSelection | None] = []
        for density, numel in zip(densities, numels):
            rank = keep_count(density, numel) + 1
            if density <= 0 or rank >= numel:
                # Density 0 keeps nothing, and a rank past the last entry keeps every entry.
                self._kept_without_selection.append(0 if density <= 0 else numel)
                self._selections.append(None)
            else:
                self._kept_without_selection.append(None)
                self._selections.append(MagnitudeSelection(rank, numel, compute_dtype))

    @classmethod
    def for_targets(cls, targets: Sequence[MergeTarget], compute_dtype: torch.dtype) -> TrimThresholds | None:
        """Return the reducer for a merge with `scope: model`, or None with `scope: tensor`."""
        if not targets or targets[0].params["scope"] != "model":
            return None
        count = len(targets[0].model_params)
        densities = [targets[0].model_params[index]["density"] for index in range(count)]
        numels = [sum(target.model_numel[index] for target in targets) for index in range(count)]
        return cls(densities, numels, compute_dtype)

    @property
    def done(self) -> bool:
        return all(selection is None or selection.done for selection in self._selections)

    @property
    def max_passes(self) -> int:
        return max((selection.max_passes for selection in self._selections if selection is not None), default=0)

    @property
    def memory_bytes(self) -> int:
        return SELECTION_HISTOGRAM_BYTES * sum(selection is not None for selection in self._selections)

    def update(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        *,
        models: Sequence[int],
        params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
    ) -> None:
        """Add the task vectors of one tensor to the histogram of the current pass."""
        if base is None:
            raise ValueError(f"ties needs a base model tensor, got None for {name}")
        pending = [position for position, model in enumerate(models) if self._pending(model)]
        if not pending or base.numel() == 0:
            return
        if self._passes == 0:
            for position in pending:
                self._counted[models[position]] += base.numel()
        inputs = TaskVectors(base, tensors, self.compute_dtype)
        for chunk in inputs.chunks(pending):
            for position, delta in zip(pending, chunk.deltas):
                self._selections[models[position]].count(delta, inputs.scratch)

    def _pending(self, model: int) -> bool:
        selection = self._selections[model]
        return selection is not None and not selection.done

    def finish_pass(self) -> None:
        # The rank of the threshold assumes the numel given up front, so a pass that saw another
        # count of entries would cut at the wrong place without this check.
        if self._passes == 0:
            for model, selection in enumerate(self._selections):
                if selection is not None and self._counted[model] != self.numels[model]:
                    raise RuntimeError(f"the statistics pass saw {self._counted[model]} entries of the task vector "
                                       f"of model {model}, but the plan counts {self.numels[model]}")
        self._passes += 1
        for model in range(len(self._selections)):
            if self._pending(model):
                self._selections[model].next_digit()

    def result(self) -> tuple[ModelThreshold, ...]:
        if not self.done:
            raise RuntimeError("the trim thresholds are not found yet: run the statistics passes first")
        thresholds = []
        for numel, kept_count, selection in zip(self.numels, self._kept_without_selection, self._selections):
            if selection is None:
                thresholds.append(ModelThreshold(numel, kept_count, None))
            else:
                minimum_key, count = selection.cut_with_ties()
                thresholds.append(ModelThreshold(numel, count, minimum_key))
        return tuple(thresholds)

    def describe(self) -> list[str]:
        return [threshold.describe(self.compute_dtype) for threshold in self.result()]


@dataclass(frozen=True)
class WholeModelTies:
    """The whole-model statistics of a `scope: model` TIES merge: each model's trim, and the majority sign."""

    thresholds: tuple[ModelThreshold, ...]
    majority: int
    """+1 or −1: the elected sign of the coordinates whose elected sum is exactly 0."""

    def for_models(self, positions: Sequence[int]) -> WholeModelTies:
        """Return the statistics of the models at `positions`, with the same majority."""
        return WholeModelTies(tuple(self.thresholds[position] for position in positions), self.majority)


class TiesStatistics(ModelStatistics):
    """Finds the trim thresholds (`TrimThresholds`), then in one more pass the majority elected sign.

    The extra pass trims every merged tensor with the thresholds found, elects its signs and adds
    up Σ sign(elected sum) over the whole model, as the TIES paper's code does on the flattened model.
    """

    purpose = "the trim threshold of each task vector and the majority elected sign over the whole model"

    def __init__(self, thresholds: TrimThresholds):
        self.thresholds = thresholds
        self.compute_dtype = thresholds.compute_dtype
        self._found: tuple[ModelThreshold, ...] | None = None
        self._balance = 0
        self._balance_done = False

    @classmethod
    def for_targets(cls, targets: Sequence[MergeTarget], compute_dtype: torch.dtype) -> TiesStatistics | None:
        """Return the reducer for a merge with `scope: model`, or None with `scope: tensor`."""
        thresholds = TrimThresholds.for_targets(targets, compute_dtype)
        return None if thresholds is None else cls(thresholds)

    @property
    def done(self) -> bool:
        return self.thresholds.done and self._balance_done

    @property
    def max_passes(self) -> int:
        return self.thresholds.max_passes + 1

    @property
    def memory_bytes(self) -> int:
        return self.thresholds.memory_bytes

    def update(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        *,
        models: Sequence[int],
        params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
    ) -> None:
        """Feed one tensor to the threshold passes, or, once they are done, to the sign-balance pass."""
        if not self.thresholds.done:
            self.thresholds.update(name, base, tensors, models=models, params=params, model_params=model_params)
            return
        if self._found is None:
            self._found = self.thresholds.result()
        if base is None:
            raise ValueError(f"ties needs a base model tensor, got None for {name}")
        if base.numel() == 0:
            return
        inputs = TaskVectors(base, tensors, self.compute_dtype)
        trims = [ThresholdTrim(self._found[model]) for model in models]
        self._balance += elected_sign_balance(trimmed_chunks(inputs, trims), [mp["weight"] for mp in model_params],
                                              sign_election=params["sign_election"], scratch=inputs.scratch)

    def finish_pass(self) -> None:
        if not self.thresholds.done:
            self.thresholds.finish_pass()
        else:
            self._balance_done = True

    def result(self) -> WholeModelTies:
        if not self.done:
            raise RuntimeError("the TIES statistics are not complete: run the statistics passes first")
        return WholeModelTies(self.thresholds.result(), majority_sign(self._balance))

    def describe(self) -> list[str]:
        sign = "+" if majority_sign(self._balance) > 0 else "−"
        return [f"{line}; zero sums elect {sign} (the whole-model majority)" for line in self.thresholds.describe()]


def check_model_scope(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that `scope` is one value, and that with `scope: model` each model's density is one value."""
    problem = varying_param_problem(targets, "scope")
    if problem is not None:
        return [problem]
    if not targets or targets[0].params["scope"] != "model":
        return []

    problems = []
    first = targets[0]
    for index in range(len(first.model_params)):
        density = first.model_params[index]["density"]
        other = next((target for target in targets if not _same_density(target.model_params[index]["density"], density)),
                     None)
        if other is not None:
            problems.append(
                f"`density` of models[{index}] varies by tensor ({density:g} for {first.name}, "
                f"{other.model_params[index]['density']:g} for {other.name}), but `scope: model` trims the "
                f"task vector over the whole model with one density; give models[{index}] one `density` "
                "for every tensor, or set `scope: tensor` under `parameters:`")
    return problems


def _same_density(value: float, other: float) -> bool:
    # A gradient of equal values interpolates to values that may differ in the last bit.
    return math.isclose(value, other, rel_tol=1e-9, abs_tol=1e-12)


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
    statistics: WholeModelTies | Sequence[ModelThreshold] | None = None,
) -> torch.Tensor:
    """Return θ₀ + λ · (disjoint merge of the trimmed task vectors). `seeds` is unused.

    With `scope: model`, `statistics` gives each model's whole-model trim threshold, and as
    `WholeModelTies` also the whole-model majority sign for zero sums (a bare sequence of
    thresholds takes the tensor's majority). With `scope: tensor` it must be None, and the
    thresholds come from the tensor alone.

    The tensor is processed in chunks, so besides the result only a few chunk-sized buffers
    per model exist. With `scope: tensor`, it takes one histogram pass per digit of the trim
    thresholds (at most one for 16-bit floats, two for float32 and four for float64, see
    `MagnitudeSelection`). Then, for either scope, one pass counts the elected signs and one
    merges.
    """
    if base is None:
        raise ValueError("ties needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    check_sign_election(params["sign_election"])
    weights = [mp["weight"] for mp in model_params]
    inputs = TaskVectors(base, tensors, compute_dtype)
    majority = None
    if isinstance(statistics, WholeModelTies):
        majority = statistics.majority
        statistics = statistics.thresholds
    trims = _trims(params["scope"], inputs, model_params, statistics)

    find_thresholds(inputs, trims)
    merged = consensus_merge(
        lambda: trimmed_chunks(inputs, trims),
        inputs.empty_output(),
        weights,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
        scale=params["lambda"],
        scratch=inputs.scratch,
        majority=majority,
    )
    return merged.view(inputs.shape)


def _trims(
    scope: str, inputs: TaskVectors, model_params: Sequence[Mapping[str, Any]], statistics: Sequence[ModelThreshold] | None
) -> list[Trim] | list[ThresholdTrim]:
    if scope == "tensor":
        if statistics is not None:
            raise ValueError("ties with scope `tensor` takes no whole-model statistics, but got some")
        return [Trim(mp["density"], inputs.numel, inputs.compute_dtype) for mp in model_params]
    if scope != "model":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if statistics is None:
        raise ValueError("ties with scope `model` needs the whole-model trim thresholds as `statistics`, got None; "
                         "the executor finds them with `TrimThresholds` before the merge")
    if len(statistics) != inputs.count:
        raise ValueError(f"ties needs one trim threshold per model: got {len(statistics)} for {inputs.count} models")
    return [ThresholdTrim(threshold) for threshold in statistics]


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
        SCOPE,
    ),
    check_model=check_model_scope,
    statistics=TiesStatistics.for_targets,
)
