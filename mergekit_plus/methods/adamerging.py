"""AdaMerging: task-wise or layer-wise merge coefficients learned by entropy minimisation.

Paper: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
arXiv:2310.02575.

Formula, with base θ₀, models θ₁ … θ_T and task vectors τᵢ = θᵢ − θ₀:

    granularity task:   θ(λ) = θ₀ + Σᵢ λᵢ τᵢ                    (one λᵢ per model)
    granularity layer:  θ[k](Λ) = θ₀[k] + Σᵢ Λᵢₖ τᵢ[k]         (one Λᵢₖ per model and merged tensor k)

The coefficients start at `init` and take `steps` Adam steps that minimise the prediction entropy
of θ(λ) on unlabelled inputs of every task (`mergekit_plus/learn/adamerging.py` runs that phase
before the merge). For sequence classifiers, as in the paper, that is the entropy of each task's
own head's label distribution on the task's texts. For causal LMs, it is the entropy of the
next-token distributions at the positions of the merged model's own answer. With `clamp`, every forward pass uses clamp(λ, 0, 1), as the paper's code does.
With `task_vectors: ties` (the paper's "AdaMerging++"), each τᵢ is first TIES-processed: entries
with |τᵢ| below the model's trim threshold qᵢ become 0 (qᵢ keeps the top `density` fraction of the
whole flattened task vector), and entries whose sign disagrees with sign(Σᵢ τ̂ᵢ) become 0.

The operator below is the last step only: a task arithmetic with one coefficient per model and
tensor, `coefficient`, which the learning phase fills in (or the recipe sets, to skip learning).

Parameters:
    granularity (default "layer"): "task" or "layer".
    steps (default 500), lr (default 0.001), init (default 0.3), clamp (default true): the
        optimisation, with the paper's code's values.
    task_vectors (default "plain"): "plain" or "ties" (AdaMerging++), with `density` (default 0.2).
    positions (default "answer"), answer_tokens (default 4): the entropy objective for causal
        LMs, see docs/methods/adamerging.md; a recipe of sequence classifiers may not set them.
    batches_per_step (default 1): mini-batches per task in each Adam step.
    coefficients (default ""): a JSON file of coefficients that an earlier run wrote; learning
        is then skipped.
    coefficient (per model, default unset): the model's coefficient for a tensor. Set for every
        model (a number or a filter list), it skips learning.
    threshold (per model, default unset): the model's trim threshold qᵢ for `task_vectors: ties`,
        computed by the learning phase over the whole model.

Not covered: the learning phase keeps the base and every task vector in memory, as the paper's
method does. Where Σᵢ τ̂ᵢ is exactly 0 the elected sign is +, not the majority sign that the
`ties` method uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.methods.chunks import TaskVectors
from mergekit_plus.methods.linear import validate_inputs

GRANULARITIES = ("task", "layer")
TASK_VECTOR_KINDS = ("plain", "ties")
POSITIONS = ("answer", "first")

PARAMS = (
    Param("granularity", str, "layer",
          'Coefficients to learn: "task" (one per model) or "layer" (one per model and merged tensor).',
          choices=GRANULARITIES),
    Param("steps", int, 500, "Adam steps of the entropy minimisation; 0 keeps every coefficient at `init`.",
          minimum=0),
    Param("lr", float, 1e-3, "Adam learning rate of the coefficients.", minimum=0.0),
    Param("init", float, 0.3, "Initial value of every coefficient."),
    Param("clamp", bool, True, "Clamp the coefficients to [0, 1] in every forward pass and in the result."),
    Param("task_vectors", str, "plain",
          '"plain" task vectors, or "ties" to TIES-process them first (AdaMerging++).',
          choices=TASK_VECTOR_KINDS),
    Param("density", float, 0.2,
          "With task_vectors ties: fraction of each flattened task vector that the trim keeps.",
          minimum=0.0, maximum=1.0),
    Param("positions", str, "answer",
          '"answer": entropy at every position of the merged model\'s own greedy answer; '
          '"first": at the first answer token only.',
          choices=POSITIONS),
    Param("answer_tokens", int, 4, "Number of greedy answer tokens whose predictions enter the entropy.",
          minimum=1),
    Param("batches_per_step", int, 1, "Mini-batches per task in each Adam step.", minimum=1),
    Param("coefficients", str, "",
          "A coefficients JSON file written by an earlier run; when set, learning is skipped."),
    Param("coefficient", float, None,
          "This model's coefficient. Set for every model, it skips learning.", per_model=True),
    Param("threshold", float, None,
          "This model's trim threshold with task_vectors ties; the learning phase computes it.",
          per_model=True, minimum=0.0),
)


def check_params(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Reject trim thresholds on plain task vectors, where they would do nothing."""
    if params["task_vectors"] == "plain" and any(mp["threshold"] is not None for mp in model_params):
        return ["`threshold` applies only with `task_vectors: ties`; remove it or set task_vectors to ties"]
    return []


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return θ₀ + Σᵢ λᵢ τᵢ with λᵢ the model's `coefficient`, on TIES-processed τᵢ with task_vectors ties.

    The coefficients are used as given: the learning phase has already clamped them. `seeds` is unused.
    """
    if base is None:
        raise ValueError("adamerging needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    coefficients = [mp["coefficient"] for mp in model_params]
    if any(value is None for value in coefficients):
        raise ValueError("adamerging has no coefficient for this tensor: the learning phase sets it before the "
                         "merge, or the recipe sets `coefficient` for every model")
    ties = params["task_vectors"] == "ties"
    thresholds = [mp["threshold"] for mp in model_params]
    if ties and any(value is None for value in thresholds):
        raise ValueError("adamerging with task_vectors ties has no trim threshold for this tensor; "
                         "the learning phase computes it before the merge")

    inputs = TaskVectors(base, tensors, compute_dtype)
    output = inputs.empty_output()
    for chunk in inputs.chunks():
        deltas = list(chunk.deltas)
        if ties:
            deltas = ties_process(deltas, thresholds)
        merged = torch.zeros_like(chunk.base)
        for delta, coefficient in zip(deltas, coefficients):
            merged.add_(delta, alpha=coefficient)
        torch.add(merged, chunk.base, out=output[chunk.start : chunk.stop])
    return output.view(inputs.shape)


def ties_process(deltas: Sequence[torch.Tensor], thresholds: Sequence[float]) -> list[torch.Tensor]:
    """Return the TIES-processed task vectors: trimmed below each threshold, then the elected sign only.

    The elected sign is sign(Σᵢ τ̂ᵢ), and + where that sum is 0. Differentiable in nothing: the
    masks are constants of the task vectors.
    """
    trimmed = [delta * (delta.abs() >= threshold) for delta, threshold in zip(deltas, thresholds)]
    elected = torch.where(torch.stack(trimmed).sum(dim=0) >= 0, 1.0, -1.0).to(trimmed[0].dtype)
    return [delta * (torch.sign(delta) == elected) for delta in trimmed]


@dataclass(frozen=True)
class LearnedMergeMethod(MergeMethod):
    """A merge method whose coefficients a learning phase on the recipe's `data:` sets before the merge."""

    plan_learning: Callable[..., Any] | None = None
    """Return the learning phase of a plan (`learn.LearningPhase`), or None when the recipe gives the
    coefficients. Called by the planner with (recipe, plan)."""
    uses_data: bool = True


def _plan_learning(recipe: Any, plan: Any) -> Any:
    from mergekit_plus.learn.adamerging import plan_adamerging

    return plan_adamerging(recipe, plan)


METHOD = LearnedMergeMethod(
    name="adamerging",
    title="AdaMerging",
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024, arXiv:2310.02575",
    summary="Learns task-wise or layer-wise task-vector coefficients by entropy minimisation on unlabelled inputs.",
    requires_base=True,
    operator=operator,
    params=PARAMS,
    check=check_params,
    plan_learning=_plan_learning,
)
