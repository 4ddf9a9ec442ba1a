"""LiNeS: scale a (merged) task vector by a factor that grows linearly with the block's depth.

Paper: Wang, Dimitriadis et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging", ICLR 2025, arXiv:2410.17146.

Steps, with base θ₀, models θ₁ … θ_T, task vectors τ_t = θ_t − θ₀ and L blocks:

1. Multi-task vector τ_MTL, set by `inner`. "task_arithmetic" takes Σ w_t τ_t. "ties" takes the
   TIES merge of the τ_t before its λ: trim to `density` with its `scope`, elect signs, and take
   the disjoint mean or sum (see `methods/ties.py`). With one model and unit weight, τ_MTL = τ₁,
   which is the paper's single-task editing.
2. Scale per tensor: λ(ℓ) = α + β · ℓ / (L − 1) for a tensor in block ℓ (0-based), so the first
   block gets α and the last α + β. Tensors outside the blocks (embeddings, final norm, head) get α,
   as the authors' code does, and so does every tensor of a one-block model.
3. θ = θ₀ + λ(ℓ) · τ_MTL.

α, when unset, follows the paper's rule for merging: α = (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁) / T, with L1 norms
over every merged tensor and the untrimmed, unweighted task vectors in Σ_t τ_t. For task arithmetic
with all weights 1 the two norms are equal, so α = 1/T exactly and no pass is needed; otherwise a
statistics pass computes the norms before the merge. Where ‖τ_MTL‖₁ = 0 the merge returns θ₀ for any
α, and α is set to 1/T.

Parameters:
    weight (per model, default 1.0): coefficient w_t of the model's task vector in τ_MTL.
    alpha (default unset): the scale of the first block and of the tensors outside the blocks.
        Unset, the rule above.
    beta (default unset): the increase of the scale from the first block to the last. Unset with one
        model, 1 − α (the paper's single-task editing rule, which keeps the whole update in the last
        block). A merge of several models must set it: the paper picks it on validation data from
        {0.1, …, 1.0} for task arithmetic and {0.1, …, 1.5} for TIES.
    inner (default "task_arithmetic"): "task_arithmetic" or "ties", see step 1. "consensus" is
        reserved and rejected for now.
    density (per model, default 0.2), normalize (default true, the disjoint mean of the authors'
        code), sign_election (default "trimmed") and scope (default "model"): the TIES settings of
        `inner: ties`. Under `inner: task_arithmetic` they are rejected unless left at their defaults.
    alpha, beta, inner and scope must each be one value for the whole merge.

Where the authors' code differs: it finds a tensor's block by the substring ".ℓ." in its name,
which misplaces a name with another number between dots; this module takes the index after the
block container (`layers.ℓ.`, `h.ℓ.`, `layer.ℓ.`, `blocks.ℓ.`, `resblocks.ℓ.`) and takes L from the
config. The code scales a single task vector from α to 1 with β = 1 − α, which is the default here
for one model.

Not covered: choosing β (or α for single-task editing) on validation data; `inner: consensus`;
models with several block stacks of different depth (encoder-decoder, two-tower), which share one L.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.base import (
    MergeMethod,
    MergeTarget,
    ModelStatistics,
    Param,
    TensorLayer,
    varying_param_problem,
)
from mergekit_plus.methods.chunks import Chunk, TaskVectors
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.sparsify import SIGN_ELECTIONS, consensus_merge
from mergekit_plus.methods.task_arithmetic import WEIGHT, weighted_sum
from mergekit_plus.methods.ties import (
    SCOPES,
    ModelThreshold,
    ThresholdTrim,
    Trim,
    TrimThresholds,
    check_model_scope,
    find_thresholds,
    trimmed_chunks,
)

logger = logging.getLogger(__name__)

INNERS = ("task_arithmetic", "ties", "consensus")
"""Choices of the `inner` parameter. "consensus" is listed so that a recipe naming it gets a clear error."""

ALPHA = Param(
    "alpha",
    float,
    None,
    "Scale of the merged task vector in the first block and outside the blocks. Unset: the paper's "
    "rule (L1 norm of the sum of the task vectors over that of the merged one, divided by the number "
    "of models), which is 1/T for task arithmetic with unit weights.",
)
BETA = Param(
    "beta",
    float,
    None,
    "Increase of the scale from the first block to the last, linear in the block index. Unset: 1 - alpha "
    "when editing one model; a merge of several models must set it (the paper tunes it from 0.1 to 1.0, "
    "or to 1.5 with TIES).",
)
INNER = Param(
    "inner",
    str,
    "task_arithmetic",
    'How the merged task vector is made before the layer scaling: "task_arithmetic" (weighted sum) or '
    '"ties" (TIES merge before its lambda). One value for the whole merge.',
    choices=INNERS,
)
DENSITY = Param(
    "density",
    float,
    0.2,
    "With `inner: ties`: fraction of this model's task-vector entries kept by the TIES trim.",
    per_model=True,
    minimum=0.0,
    maximum=1.0,
)
NORMALIZE = Param(
    "normalize",
    bool,
    True,
    "With `inner: ties`: divide by the sum of the agreeing models' weights (disjoint mean, as the "
    "authors' code does); false gives the disjoint sum.",
)
SIGN_ELECTION = Param(
    "sign_election",
    str,
    "trimmed",
    'With `inner: ties`: "trimmed" elects the sign of the sum of the trimmed task vectors (TIES paper), '
    '"weighted" the sign of their weighted sum (mergekit).',
    choices=SIGN_ELECTIONS,
)
SCOPE = Param(
    "scope",
    str,
    "model",
    'With `inner: ties`: where the trim ranks each task vector\'s entries, "model" over the whole model '
    '(TIES paper, one or two more statistics passes) or "tensor" within each tensor (mergekit).',
    choices=SCOPES,
)
_TIES_PARAMS = (DENSITY, NORMALIZE, SIGN_ELECTION, SCOPE)
_UNIFORM_PARAMS = ("alpha", "beta", "inner")


def layer_scale(alpha: float, beta: float, layer: TensorLayer) -> float:
    """Return λ(ℓ) = α + β · ℓ / (L − 1) for a block tensor, and α outside the blocks or with one block."""
    if layer.index is None or layer.count <= 1:
        return alpha
    if not 0 <= layer.index < layer.count:
        raise ValueError(f"block index {layer.index} is outside the model's {layer.count} blocks")
    return alpha + beta * layer.index / (layer.count - 1)


@dataclass(frozen=True)
class ModelEntry:
    """One model's entry of the operator's `statistics`: the results of the statistics passes."""

    alpha: float | None
    """α from the whole-model norms, or None when the recipe sets it or the rule needs no pass."""
    threshold: ModelThreshold | None
    """The model's whole-model TIES trim threshold with `inner: ties` and `scope: model`, else None."""


def _unit_weights(model_params: Sequence[Mapping[str, Any]]) -> bool:
    return all(values["weight"] == 1.0 for values in model_params)


def _resolve_alpha(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                   statistics: Sequence[ModelEntry] | None) -> float:
    if params["alpha"] is not None:
        return params["alpha"]
    found = {entry.alpha for entry in statistics or () if entry.alpha is not None}
    if len(found) == 1:
        return found.pop()
    if params["inner"] == "task_arithmetic" and _unit_weights(model_params):
        # NOTE: T counts the models passed here. Under `tokenizer.vocab: align`, rows that only
        # some models hold get 1/(their count), the mean of those models' task vectors.
        return 1.0 / len(model_params)
    raise ValueError("lines without `alpha` needs α from the whole-model norms as `statistics`, got none; "
                     "the executor computes it in a statistics pass before the merge")


def _resolve_beta(params: Mapping[str, Any], alpha: float, count: int) -> float:
    if params["beta"] is not None:
        return params["beta"]
    if count == 1:
        return 1.0 - alpha
    raise ValueError(f"lines merging {count} models needs `beta`, got none")


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
    statistics: Sequence[ModelEntry] | None = None,
    layer: TensorLayer | None = None,
) -> torch.Tensor:
    """Return θ₀ + λ(ℓ) · τ_MTL for a tensor in block `layer`. `seeds` is unused.

    `statistics` contains α when the recipe leaves it unset and the rule needs the whole-model norms,
    and each model's TIES trim threshold with `inner: ties` and `scope: model`.
    Task arithmetic works chunk by chunk. TIES takes one or more histogram passes with
    `scope: tensor`, then one pass for the signs and one for the merge (see `methods/ties.py`).
    """
    if base is None:
        raise ValueError("lines needs a base model tensor, got None")
    if layer is None:
        raise ValueError("lines needs the tensor's block as `layer`, got None; the planner sets it for "
                         "methods with `layered=True`")
    validate_inputs(base, tensors, model_params)
    _check_inner(params["inner"])
    alpha = _resolve_alpha(params, model_params, statistics)
    scale = layer_scale(alpha, _resolve_beta(params, alpha, len(tensors)), layer)

    inputs = TaskVectors(base, tensors, compute_dtype)
    weights = [values["weight"] for values in model_params]
    if params["inner"] == "task_arithmetic":
        output = inputs.empty_output()
        for chunk in inputs.chunks():
            merged = weighted_sum(chunk.deltas, weights, normalize=False)
            torch.add(merged.mul_(scale), chunk.base, out=output[chunk.start : chunk.stop])
        return output.view(inputs.shape)

    trims = _ties_trims(params["scope"], inputs, model_params, statistics)
    find_thresholds(inputs, trims)
    merged = consensus_merge(
        lambda: trimmed_chunks(inputs, trims),
        inputs.empty_output(),
        weights,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
        scale=scale,
        scratch=inputs.scratch,
    )
    return merged.view(inputs.shape)


def _check_inner(inner: str) -> None:
    if inner == "consensus":
        raise NotImplementedError("lines with `inner: consensus` is not implemented; use task_arithmetic or ties")
    if inner not in INNERS:
        raise ValueError(f"inner must be one of {INNERS}, got {inner!r}")


def _ties_trims(
    scope: str,
    inputs: TaskVectors,
    model_params: Sequence[Mapping[str, Any]],
    statistics: Sequence[ModelEntry] | None,
) -> list[Trim] | list[ThresholdTrim]:
    if scope == "tensor":
        return [Trim(values["density"], inputs.numel, inputs.compute_dtype) for values in model_params]
    if scope != "model":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    thresholds = [entry.threshold for entry in statistics or ()]
    if len(thresholds) != inputs.count or any(threshold is None for threshold in thresholds):
        raise ValueError("lines with `inner: ties` and `scope: model` needs one whole-model trim threshold per "
                         "model as `statistics`; the executor finds them in statistics passes before the merge")
    return [ThresholdTrim(threshold) for threshold in thresholds]


def _with_zero_base(chunks: Iterator[Chunk], inputs: TaskVectors) -> Iterator[Chunk]:
    """Yield the chunks with a zero base, so that a merge that adds the base returns τ_MTL itself."""
    for chunk in chunks:
        zeros = inputs.scratch.get("zero base", chunk.base.dtype, chunk.stop - chunk.start).zero_()
        yield Chunk(chunk.start, chunk.stop, zeros, chunk.deltas)


class NormStatistics(ModelStatistics):
    """Finds α = (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁) / T over the whole model, after any TIES trim thresholds.

    With `inner: ties` and `scope: model`, the passes of `TrimThresholds` come first, because
    τ_MTL depends on the thresholds. The last pass builds τ_MTL of every tensor as the merge pass
    does, without the layer scale, and sums both L1 norms in float64. When the recipe sets α, only
    the threshold passes run.
    """

    def __init__(self, targets: Sequence[MergeTarget], compute_dtype: torch.dtype, *, needs_norms: bool):
        self.compute_dtype = compute_dtype
        self.model_count = len(targets[0].model_params)
        self.thresholds = (TrimThresholds.for_targets(targets, compute_dtype)
                           if targets[0].params["inner"] == "ties" else None)
        self.needs_norms = needs_norms
        # τ_MTL of a TIES merge is built over a whole tensor, because the majority sign is per tensor.
        largest = max((max(target.model_numel, default=0) for target in targets), default=0)
        self._tensor_bytes = largest * compute_dtype.itemsize if targets[0].params["inner"] == "ties" else 0
        parts = []
        if self.thresholds is not None:
            parts.append("the TIES trim threshold of each task vector")
        if needs_norms:
            parts.append("the L1 norms that set the LiNeS alpha")
        self.purpose = " and ".join(parts) + " over the whole model"
        self.sum_norm = 0.0
        """‖Σ_t τ_t‖₁ over every merged tensor."""
        self.merged_norm = 0.0
        """‖τ_MTL‖₁ over every merged tensor."""
        self._counted = not needs_norms
        self._threshold_result: tuple[ModelThreshold | None, ...] | None = None

    @classmethod
    def for_targets(cls, targets: Sequence[MergeTarget], compute_dtype: torch.dtype) -> NormStatistics | None:
        """Return the reducer for a merge that needs TIES thresholds or the α norms, else None."""
        if not targets:
            return None
        params = targets[0].params
        needs_norms = params["alpha"] is None and not (
            params["inner"] == "task_arithmetic" and all(_unit_weights(target.model_params) for target in targets))
        needs_thresholds = params["inner"] == "ties" and params["scope"] == "model"
        if not needs_norms and not needs_thresholds:
            return None
        return cls(targets, compute_dtype, needs_norms=needs_norms)

    @property
    def _thresholds_pending(self) -> bool:
        return self.thresholds is not None and not self.thresholds.done

    @property
    def done(self) -> bool:
        return not self._thresholds_pending and self._counted

    @property
    def max_passes(self) -> int:
        return (self.thresholds.max_passes if self.thresholds is not None else 0) + int(self.needs_norms)

    @property
    def memory_bytes(self) -> int:
        histograms = self.thresholds.memory_bytes if self.thresholds is not None else 0
        return histograms + (self._tensor_bytes if self.needs_norms else 0)

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
        """Add one tensor to the pending threshold pass, or else to the two L1 norms."""
        if self._thresholds_pending:
            self.thresholds.update(name, base, tensors, models=models, params=params, model_params=model_params)
            return
        if base is None:
            raise ValueError(f"lines needs a base model tensor, got None for {name}")
        if base.numel() == 0:
            return

        inputs = TaskVectors(base, tensors, self.compute_dtype)
        scratch = inputs.scratch
        for chunk in inputs.chunks():
            total = scratch.get("sum", self.compute_dtype, chunk.stop - chunk.start).copy_(chunk.deltas[0])
            for delta in chunk.deltas[1:]:
                total.add_(delta)
            self.sum_norm += float(total.abs_().sum(dtype=torch.float64))
            if params["inner"] == "task_arithmetic":
                merged = weighted_sum(chunk.deltas, [values["weight"] for values in model_params], normalize=False)
                self.merged_norm += float(merged.abs_().sum(dtype=torch.float64))
        if params["inner"] == "ties":
            entries = [ModelEntry(None, self._thresholds()[model]) for model in models]
            trims = _ties_trims(params["scope"], inputs, model_params, entries)
            find_thresholds(inputs, trims)
            merged = consensus_merge(
                lambda: _with_zero_base(trimmed_chunks(inputs, trims), inputs),
                inputs.empty_output(),
                [values["weight"] for values in model_params],
                sign_election=params["sign_election"],
                normalize=params["normalize"],
                scale=1.0,
                scratch=scratch,
            )
            self.merged_norm += float(merged.abs_().sum(dtype=torch.float64))

    def _thresholds(self) -> tuple[ModelThreshold | None, ...]:
        if self._threshold_result is None:
            self._threshold_result = (self.thresholds.result() if self.thresholds is not None
                                      else (None,) * self.model_count)
        return self._threshold_result

    def finish_pass(self) -> None:
        if self._thresholds_pending:
            self.thresholds.finish_pass()
            return
        self._counted = True
        if self.needs_norms:
            logger.info("lines: alpha = %.6g from ‖Σ τ‖₁ = %.6g and ‖τ_MTL‖₁ = %.6g over %d models",
                        self.alpha, self.sum_norm, self.merged_norm, self.model_count)

    @property
    def alpha(self) -> float:
        """α by the paper's rule, or 1/T where τ_MTL is zero and every α gives the base."""
        if self.merged_norm == 0.0 or not math.isfinite(self.merged_norm):
            return 1.0 / self.model_count
        return self.sum_norm / self.merged_norm / self.model_count

    def result(self) -> tuple[ModelEntry, ...]:
        if not self.done:
            raise RuntimeError("the LiNeS statistics are not complete: run the statistics passes first")
        alpha = self.alpha if self.needs_norms else None
        return tuple(ModelEntry(alpha, threshold) for threshold in self._thresholds())

    def describe(self) -> list[str]:
        if self.thresholds is None:
            return []
        return [threshold.describe(self.compute_dtype) for threshold in self._thresholds()]


def check_params(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Reject `inner: consensus`, TIES settings under task arithmetic, and a missing `beta` for several models."""
    problems = []
    if params["inner"] == "consensus":
        problems.append("`inner: consensus` is not implemented for lines yet; set `inner` to task_arithmetic or ties")
    if params["inner"] == "task_arithmetic":
        changed = [param.name for param in _TIES_PARAMS if not param.per_model and params[param.name] != param.default]
        if any(values["density"] != DENSITY.default for values in model_params):
            changed.append("density")
        if changed:
            names = ", ".join(f"`{name}`" for name in changed)
            problems.append(f"{names} only apply with `inner: ties`, but `inner` is task_arithmetic; "
                            "remove them or set `inner: ties`")
    if params["beta"] is None and len(model_params) > 1:
        problems.append(f"`beta` is required when merging {len(model_params)} models: set it under `parameters:` "
                        "(the paper tunes it from 0.1 to 1.0 for task arithmetic and to 1.5 for TIES)")
    return problems


def check_model(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that alpha, beta and inner are one value each, and with `inner: ties` the TIES scope and densities."""
    problems = [problem for name in _UNIFORM_PARAMS
                if (problem := varying_param_problem(targets, name, "LiNeS scales the whole model with one value"))]
    if problems or not targets or targets[0].params["inner"] != "ties":
        return problems
    return check_model_scope(targets)


METHOD = MergeMethod(
    name="lines",
    title="LiNeS (layer-increasing network scaling)",
    paper="Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging, "
          "ICLR 2025, arXiv:2410.17146",
    summary="Adds the task-arithmetic or TIES vector scaled from alpha in the first block to alpha + beta in the last.",
    requires_base=True,
    operator=operator,
    params=(WEIGHT, ALPHA, BETA, INNER, DENSITY, NORMALIZE, SIGN_ELECTION, SCOPE),
    check=check_params,
    check_model=check_model,
    statistics=NormStatistics.for_targets,
    layered=True,
)
