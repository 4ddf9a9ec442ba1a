"""Consensus Merging: keep only the entries of the multi-task vector that several tasks use.

Paper: Wang, Dimitriadis et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, arXiv:2405.07813 (Consensus-TA and Consensus-TIES).

Steps, with base θ₀, models θ₁ … θ_T and task vectors τ_t = θ_t − θ₀:

1. Multi-task vector τ_MTL: Σ τ_t with `inner: task_arithmetic` (Consensus-TA, the default), or
   the TIES merge of the τ_t before scaling with `inner: ties` (Consensus-TIES). See
   `methods/tall_masks.py`.
2. TALL mask of each task: m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|], λ_t the model's `mask_lambda`.
3. Consensus mask: m_cons = 1[Σ_t m_t ≥ k]. With k = 2 it drops the "selfish" entries, which only
   one task's mask keeps, and the "catastrophic" ones, which no mask keeps.
4. θ = θ₀ + λ · (m_cons ⊙ τ_MTL).

k = 0 gives the inner method with scale λ, and k > T gives θ₀.

Parameters:
    mask_lambda (per model, default 0.4): λ_t of the task's TALL mask. The paper picks it per task
        on validation data from {0.2, …, 0.6}, and 0.4 is the middle of that grid.
    k (default 2): the number of task masks that must keep an entry.
    lambda (default 1.0): scale α of the consensus vector. The paper picks it on validation data
        from {0.1, …, 1.0}.
    inner (default "task_arithmetic"): "task_arithmetic" or "ties", one value for the whole merge.
    density (per model, default 0.2), normalize (default false, the paper's disjoint sum),
        sign_election (default "trimmed") and scope (default "model"): the TIES settings of
        `inner: ties`. They are rejected with `inner: task_arithmetic` unless left at their defaults.

Whole-model statistics: one pass over every merged tensor counts how many task masks keep each
entry, and the log reports the fractions of selfish and catastrophic entries. With `inner: ties`
and `scope: model`, the TIES trim thresholds take one or two passes before that one.

Not covered: choosing λ_t and λ on validation data, and per-model weights of the task vectors
(the paper has none). The paper flattens the whole model into one vector, but the masks are
element-wise, so merging tensor by tensor gives the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, MergeTarget, ModelStatistics, Param
from mergekit_plus.methods.chunks import TaskVectors
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.tall_masks import (
    INNER_PARAMS,
    MASK_LAMBDA,
    check_inner_is_uniform,
    check_inner_params,
    mask_counts,
    multi_task_vector,
    task_masks,
)
from mergekit_plus.methods.task_arithmetic import LAMBDA
from mergekit_plus.methods.ties import ModelThreshold, TrimThresholds, check_model_scope

logger = logging.getLogger(__name__)

DEFAULT_K = 2


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
    statistics: Sequence[ModelThreshold | None] | None = None,
) -> torch.Tensor:
    """Return θ₀ + λ · (m_cons ⊙ τ_MTL). `seeds` is unused.

    `statistics` contains each model's whole-model TIES trim threshold with `inner: ties` and
    `scope: model`, and None entries (or None) otherwise. τ_MTL takes one tensor-sized buffer,
    which then becomes the result, so besides it only chunk-sized buffers exist.
    """
    if base is None:
        raise ValueError("consensus needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    inputs = TaskVectors(base, tensors, compute_dtype)
    lambdas = [values["mask_lambda"] for values in model_params]

    # 1. τ_MTL over the whole tensor, because TIES elects a majority sign per tensor.
    merged = multi_task_vector(inputs, params, model_params, statistics)

    # 2. Masks and the consensus, chunk by chunk, overwriting τ_MTL with the result.
    for chunk in inputs.chunks():
        multi_task = merged[chunk.start : chunk.stop]
        counts = mask_counts(task_masks(chunk.deltas, multi_task, lambdas, inputs.scratch), inputs.scratch)
        keep = torch.ge(counts, params["k"], out=inputs.scratch.get("keep", torch.bool, counts.numel()))
        multi_task.mul_(keep).mul_(params["lambda"]).add_(chunk.base)
    return merged.view(inputs.shape)


class MaskCensus(ModelStatistics):
    """Counts, over the whole model, how many task masks keep each entry.

    With `inner: ties` and `scope: model` it first finds the TIES trim thresholds (`TrimThresholds`)
    and hands them to the operator as its result. Its last pass builds τ_MTL and the masks of every
    tensor as the merge pass does, so it costs about as much as the merge without the write.
    """

    def __init__(self, targets: Sequence[MergeTarget], compute_dtype: torch.dtype):
        self.compute_dtype = compute_dtype
        self.model_count = len(targets[0].model_params) if targets else 0
        inner = targets[0].params["inner"] if targets else "task_arithmetic"
        self.thresholds = TrimThresholds.for_targets(targets, compute_dtype) if inner == "ties" else None
        self.purpose = ("the TIES trim thresholds and the TALL mask counts" if self.thresholds is not None
                        else "the TALL mask counts")
        self._threshold_result: tuple[ModelThreshold | None, ...] | None = None
        self._counted = False
        self.entries = 0
        self.by_mask_count = [0] * (self.model_count + 1)
        """Entries by how many task masks keep them (index 0: none)."""
        self.kept_by_consensus = 0
        self.mask_sizes = [0] * self.model_count
        """Entries that each model's mask keeps."""
        self.selfish = [0] * self.model_count
        """Entries that only this model's mask keeps."""

    @classmethod
    def for_targets(cls, targets: Sequence[MergeTarget], compute_dtype: torch.dtype) -> MaskCensus:
        return cls(targets, compute_dtype)

    @property
    def _thresholds_pending(self) -> bool:
        return self.thresholds is not None and not self.thresholds.done

    @property
    def done(self) -> bool:
        return self._counted

    @property
    def max_passes(self) -> int:
        return (self.thresholds.max_passes if self.thresholds is not None else 0) + 1

    @property
    def memory_bytes(self) -> int:
        return self.thresholds.memory_bytes if self.thresholds is not None else 0

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
        """Add one tensor to the pending threshold pass, or else to the mask count."""
        if self._thresholds_pending:
            self.thresholds.update(name, base, tensors, models=models, params=params, model_params=model_params)
            return
        if base is None:
            raise ValueError(f"consensus needs a base model tensor, got None for {name}")
        if base.numel() == 0:
            return

        thresholds = self._thresholds()
        inputs = TaskVectors(base, tensors, self.compute_dtype)
        multi = multi_task_vector(inputs, params, model_params, tuple(thresholds[model] for model in models))
        lambdas = [values["mask_lambda"] for values in model_params]
        self.entries += inputs.numel
        for chunk in inputs.chunks():
            masks = task_masks(chunk.deltas, multi[chunk.start : chunk.stop], lambdas, inputs.scratch)
            counts = mask_counts(masks, inputs.scratch)
            histogram = torch.bincount(counts.to(torch.int64), minlength=len(models) + 1).tolist()
            for mask_count, entries in enumerate(histogram):
                self.by_mask_count[mask_count] += entries
            self.kept_by_consensus += int(torch.count_nonzero(counts >= params["k"]))
            alone = counts == 1
            for model, mask in zip(models, masks):
                self.mask_sizes[model] += int(torch.count_nonzero(mask))
                self.selfish[model] += int(torch.count_nonzero(mask & alone))

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
        logger.info("consensus: %s", self.summary())

    def summary(self) -> str:
        """Describe the whole-model mask counts in one line."""
        total = max(self.entries, 1)
        catastrophic = self.by_mask_count[0]
        selfish = self.by_mask_count[1] if self.model_count else 0
        return (f"of {self.entries:,} entries, {catastrophic / total:.2%} are catastrophic (no task mask keeps "
                f"them), {selfish / total:.2%} selfish (exactly one), and the consensus mask keeps "
                f"{self.kept_by_consensus / total:.2%}")

    def fractions(self) -> dict[str, float]:
        """Return the whole-model fractions of catastrophic, selfish and consensus-kept entries."""
        total = max(self.entries, 1)
        return {"catastrophic": self.by_mask_count[0] / total,
                "selfish": (self.by_mask_count[1] if self.model_count else 0) / total,
                "kept": self.kept_by_consensus / total}

    def result(self) -> tuple[ModelThreshold | None, ...]:
        if not self.done:
            raise RuntimeError("the TALL mask counts are not complete: run the statistics passes first")
        return self._thresholds()

    def describe(self) -> list[str]:
        total = max(self.entries, 1)
        lines = []
        for model in range(self.model_count):
            line = (f"its TALL mask keeps {self.mask_sizes[model]:,} entries ({self.mask_sizes[model] / total:.2%}), "
                    f"{self.selfish[model]:,} of them selfish")
            threshold = self._thresholds()[model]
            if threshold is not None:
                line = f"{threshold.describe(self.compute_dtype)}; {line}"
            lines.append(line)
        return lines


def check_consensus_model(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that `inner` is one value, and with `inner: ties` the TIES scope and densities."""
    problems = check_inner_is_uniform(targets)
    if problems or not targets or targets[0].params["inner"] != "ties":
        return problems
    return check_model_scope(targets)


METHOD = MergeMethod(
    name="consensus",
    title="Consensus Merging",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024, "
          "arXiv:2405.07813",
    summary="Adds the entries of the task-arithmetic or TIES vector that at least k tasks' TALL masks keep.",
    requires_base=True,
    operator=operator,
    params=(
        MASK_LAMBDA,
        Param("k", int, DEFAULT_K, "How many task masks must keep an entry for the merge to keep it.", minimum=0),
        LAMBDA,
        *INNER_PARAMS,
    ),
    check=check_inner_params,
    check_model=check_consensus_model,
    statistics=MaskCensus.for_targets,
)
