"""Frank-Wolfe merging (FW-Merging): pick checkpoints by the gradient of a labelled loss, step toward them.

Paper: Chen, Hu, Luk, Hospedales and Fan, "FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization", ICCV 2025, arXiv:2503.12649.

The merge minimises f(θ), the mean over tasks of the cross-entropy of labelled answers, over the
convex hull of the candidates: the recipe's models, plus θ⁽⁰⁾ ("initial") for the hard variant. Models
whose task has no data are candidates too, which is how the method meets irrelevant checkpoints.
With base θ₀, candidates θ₁ … θ_P, scaling λ and step size η:

    θ⁽⁰⁾ = θ₀ + λ Σᵢ (θᵢ − θ₀)          (init merge, merge_fn task_arithmetic)
          TIES(θ₀; θ₁ … θ_P; density, dis-sum, λ)  (init merge, merge_fn ties)
          θ₀                          (init base)
    for t = 0 … iterations − 1:
        g   = ∇f(θ⁽ᵗ⁾)
        scoreₖ(v) = ⟨gₖ, vₖ⟩ / (‖gₖ‖ ‖vₖ‖) for every merged tensor k and candidate v (full weights)
        s   = argmin_v Σₖ scoreₖ(v)  (granularity task)   or   sₖ = argmin_v scoreₖ(v)  (granularity tensor)
        hard: γ = 2/(t+2) · η;  θ⁽ᵗ⁺¹⁾ = θ⁽ᵗ⁾ + γλ (s − θ⁽ᵗ⁾)            (task_arithmetic)
                                 θ⁽ᵗ⁺¹⁾ = θ⁽ᵗ⁾ + γλ Trim(s − θ⁽ᵗ⁾)      (ties: keep the top `density`)
        soft: one gradient and one pick per task with data, each excluding the earlier picks;
              γ = 1 at t = 0, else 2/(t+2) · η;  θ⁽ᵗ⁺¹⁾ = θ⁽ᵗ⁾ + γλ Σⱼ (sⱼ − θ⁽ᵗ⁾)

`mergekit_plus/learn/frank_wolfe.py` runs the iterations before the merge. With task arithmetic
every step is linear, so θ⁽ᵀ⁾ = b θ₀ + Σᵢ cᵢ θᵢ per tensor, and the operator below is that linear
combination, with the coefficients that the learning phase fills in. A TIES step is not linear:
the learning phase then hands θ⁽ᵀ⁾ itself to the merge pass, as the only input of each tensor.

Parameters (defaults from FusionBench's fw_hard and fw_soft configs):
    variant (default "hard"): "hard" or "soft".
    iterations (default 10): Frank-Wolfe iterations; 0 returns θ⁽⁰⁾.
    step_size (default 0.1): η.
    merge_fn (default "task_arithmetic"): "task_arithmetic" or "ties" (hard only).
    scaling (default 0.3): λ, in θ⁽⁰⁾ and in every step.
    density (default 0.2): with ties, the fraction of each flattened task vector that the trim
        keeps; FusionBench's `threshold: 20` means the top 20 %.
    granularity (default "task"): "task" (one candidate for the whole model) or "tensor" (one
        candidate per merged tensor, FusionBench's "layer").
    init (default unset): "merge" or "base"; unset is "merge" for hard and "base" for soft.
    score (default "cosine"): "cosine" as above (FusionBench and the paper's code), or
        "inner_product" ⟨gₖ, vₖ⟩, the linear minimisation oracle of textbook Frank-Wolfe.
    selection (default "always"): "always" takes the minimum score (FusionBench); "negative"
        takes it only when it is below 0 and else the zero tensor (the paper's code).
    coefficients (default ""): a frank_wolfe.json that an earlier task_arithmetic run wrote;
        learning is skipped.
    coefficient (per model, default unset), base_coefficient (default unset: 1 − Σᵢ cᵢ): the
        linear combination of a tensor. Set for every model, they skip learning.

Not covered: FusionBench's entropy loss on unlabelled data and its AdaMerging inner merge of
FW-soft; the paper's code's exclusion of biases and classifier heads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.adamerging import LearnedMergeMethod
from mergekit_plus.methods.base import MergeTarget, Param, varying_param_problem
from mergekit_plus.methods.chunks import TaskVectors
from mergekit_plus.methods.linear import validate_inputs

VARIANTS = ("hard", "soft")
MERGE_FUNCTIONS = ("task_arithmetic", "ties")
GRANULARITIES = ("task", "tensor")
INITS = ("merge", "base")
SELECTIONS = ("always", "negative")
SCORES = ("cosine", "inner_product")

ZERO = -1
"""The vertex id of the zero tensor, which the `negative` selection picks when no score is below 0."""

PARAMS = (
    Param("variant", str, "hard",
          '"hard": one candidate per iteration for all tasks; "soft": one candidate per task with data.',
          choices=VARIANTS),
    Param("iterations", int, 10, "Frank-Wolfe iterations; 0 returns the initial merge.", minimum=0),
    Param("step_size", float, 0.1, "η of the step γ = 2/(t+2) · η.", minimum=0.0),
    Param("merge_fn", str, "task_arithmetic",
          "The merge of the initial point and of every step: task_arithmetic, or ties (hard variant only).",
          choices=MERGE_FUNCTIONS),
    Param("scaling", float, 0.3, "λ: task arithmetic's scale in the initial merge and in every step."),
    Param("density", float, 0.2,
          "With merge_fn ties: fraction of the entries that each trim keeps, over the whole flattened task "
          "vector or step.",
          minimum=0.0, maximum=1.0),
    Param("granularity", str, "task",
          '"task": one candidate for the whole model per pick; "tensor": one per merged tensor.',
          choices=GRANULARITIES),
    Param("init", str, None,
          'The initial point: "merge" (merge_fn over every candidate) or "base"; '
          'default "merge" for the hard variant and "base" for the soft one.',
          choices=INITS),
    Param("score", str, "cosine",
          '"cosine": the cosine of the gradient and a candidate\'s full weights, per tensor; '
          '"inner_product": their inner product.',
          choices=SCORES),
    Param("selection", str, "always",
          '"always" picks the candidate with the lowest score; "negative" picks it only when that '
          "score is below 0, and else the zero tensor.",
          choices=SELECTIONS),
    Param("coefficients", str, "",
          "A frank_wolfe.json written by an earlier merge_fn task_arithmetic run; when set, learning is skipped."),
    Param("base_coefficient", float, None,
          "The base's coefficient b in this tensor; default 1 minus the sum of the models' coefficients."),
    Param("coefficient", float, None,
          "This model's coefficient cᵢ in this tensor. Set for every model, it skips learning.", per_model=True),
)

LEARNING_PARAMS = ("variant", "iterations", "step_size", "merge_fn", "scaling", "density", "granularity", "init",
                   "score", "selection", "coefficients")
"""The parameters of the learning phase, which take one value for the whole merge."""


def initial_point(params: Mapping[str, Any]) -> str:
    """Return the initial point of a merge: `init` when set, else the variant's default."""
    if params["init"] is not None:
        return params["init"]
    return "merge" if params["variant"] == "hard" else "base"


def check_params(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Reject parameter combinations that the learning phase cannot honour."""
    problems = []
    has_coefficient = [mp["coefficient"] is not None for mp in model_params]
    if any(has_coefficient) and not all(has_coefficient):
        problems.append("`coefficient` is set for some models but not all; set it for every model to skip "
                        "learning, or for none")
    if params["merge_fn"] == "ties":
        if any(has_coefficient) or params["base_coefficient"] is not None or params["coefficients"]:
            problems.append("merge_fn ties is not linear, so coefficients cannot describe its result; remove "
                            "`coefficient`, `base_coefficient` and `coefficients`, or use merge_fn task_arithmetic")
        if params["variant"] == "soft":
            problems.append("the soft variant takes merge_fn task_arithmetic; FusionBench's soft variant has no "
                            "TIES step")
    elif params["base_coefficient"] is not None and not all(has_coefficient):
        problems.append("`base_coefficient` needs `coefficient` for every model; set both, or neither")
    return problems


def check_learning_params(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that every parameter of the learning phase is one value for the whole merge."""
    reason = "the Frank-Wolfe iterations use one value for the whole merge"
    return [problem for name in LEARNING_PARAMS if (problem := varying_param_problem(targets, name, reason))]


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return b θ₀ + Σᵢ cᵢ θᵢ with cᵢ each model's `coefficient` and b `base_coefficient` (default 1 − Σᵢ cᵢ).

    With merge_fn ties the learning phase passes no base and the learned tensor as the only input,
    and the result is that tensor in the compute dtype. `seeds` is unused.
    """
    if params["merge_fn"] == "ties":
        if base is not None or len(tensors) != 1:
            raise ValueError("frank_wolfe with merge_fn ties merges in its learning phase, which hands the merge "
                             f"pass the learned tensor alone; got a base and {len(tensors)} models instead")
        return tensors[0].to(dtype=compute_dtype, copy=True)
    if base is None:
        raise ValueError("frank_wolfe needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    coefficients = [mp["coefficient"] for mp in model_params]
    if any(value is None for value in coefficients):
        raise ValueError("frank_wolfe has no coefficient for this tensor: the learning phase sets it before the "
                         "merge, or the recipe sets `coefficient` for every model")
    # θ₀ + Σ cᵢ τᵢ is the combination when b = 1 − Σ cᵢ. Only the `negative` selection's zero tensor
    # moves b away from that, and the remainder is added as a multiple of θ₀.
    base_coefficient = params["base_coefficient"]
    remainder = 0.0 if base_coefficient is None else base_coefficient - (1.0 - math.fsum(coefficients))

    inputs = TaskVectors(base, tensors, compute_dtype)
    output = inputs.empty_output()
    for chunk in inputs.chunks():
        merged = torch.zeros_like(chunk.base)
        for delta, coefficient in zip(chunk.deltas, coefficients):
            merged.add_(delta, alpha=coefficient)
        if remainder:
            merged.add_(chunk.base, alpha=remainder)
        torch.add(merged, chunk.base, out=output[chunk.start : chunk.stop])
    return output.view(inputs.shape)


# -- the pure steps of the iterations ---------------------------------------------------------------

def step_size(iteration: int, *, eta: float, variant: str) -> float:
    """Return γ of iteration t (from 0): 2/(t+2) · η, except 1 at t = 0 in the soft variant."""
    if variant == "soft" and iteration == 0:
        return 1.0
    return 2.0 / (iteration + 2) * eta


def cosine(gradient: torch.Tensor, weight: torch.Tensor) -> float:
    """Return ⟨g, w⟩ / (‖g‖ ‖w‖), and 0 when either norm is 0 (a tensor that the loss does not reach)."""
    gradient = gradient.reshape(-1)
    weight = weight.reshape(-1)
    norms = float(torch.linalg.vector_norm(gradient)) * float(torch.linalg.vector_norm(weight))
    if norms == 0.0:
        return 0.0
    return float(torch.dot(gradient, weight)) / norms


def score(gradient: torch.Tensor, weight: torch.Tensor, *, kind: str) -> float:
    """Return the oracle's score of one tensor of a vertex: the `cosine` or the `inner_product` ⟨g, w⟩."""
    if kind == "cosine":
        return cosine(gradient, weight)
    return float(torch.dot(gradient.reshape(-1), weight.reshape(-1)))


def select_vertex(scores: Sequence[float], *, excluded: Sequence[int] = (), selection: str = "always") -> int:
    """Return the vertex with the lowest score, or ZERO.

    Ties go to the lowest index. Excluded vertices are skipped; with every vertex excluded the result
    is ZERO. With selection `negative`, a lowest score of 0 or more gives ZERO.
    """
    best = ZERO
    for vertex, score in enumerate(scores):
        if vertex in excluded:
            continue
        if best == ZERO or score < scores[best]:
            best = vertex
    if best != ZERO and selection == "negative" and not scores[best] < 0:
        return ZERO
    return best


def select_vertices(scores: Sequence[Sequence[float]], *, granularity: str, selection: str,
                    excluded: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Run the linear minimisation oracle over a table of scores; return one vertex per tensor.

    `scores[k][v]` is the score of tensor k's gradient with vertex v's tensor k. With granularity
    task the vertex is the argmin of the column sums, the same for every tensor; with tensor, the
    argmin of each row. `excluded[k]` lists the vertices that tensor k may not take (the soft
    variant's earlier picks).
    """
    excluded = excluded if excluded is not None else [()] * len(scores)
    if granularity == "task":
        count = len(scores[0]) if scores else 0
        totals = [math.fsum(row[vertex] for row in scores) for vertex in range(count)]
        vertex = select_vertex(totals, excluded=excluded[0] if excluded else (), selection=selection)
        return [vertex] * len(scores)
    return [select_vertex(row, excluded=skip, selection=selection) for row, skip in zip(scores, excluded)]


def move_toward(current: torch.Tensor, vertices: Sequence[torch.Tensor | None], scale: float) -> None:
    """Set current ← current + scale · Σⱼ (vⱼ − current) in place; a None vertex is the zero tensor.

    It updates merged weights and their coefficient rows alike, so both stay the same combination.
    """
    step = torch.zeros_like(current)
    for vertex in vertices:
        if vertex is not None:
            step.add_(vertex)
    step.sub_(current, alpha=len(vertices))
    current.add_(step, alpha=scale)


@dataclass(frozen=True)
class LabelledFrankWolfeMethod(LearnedMergeMethod):
    """A learned merge method whose `data:` rows carry answers, and whose models may lack data."""

    labelled_data: bool = True
    """Whether every data row needs a string "answer" besides its "prompt"."""
    data_for_every_model: bool = False
    """Whether every model's task needs a `data:` entry. Here a model without one is a candidate only."""


def _plan_learning(recipe: Any, plan: Any) -> Any:
    from mergekit_plus.learn.frank_wolfe import plan_frank_wolfe

    return plan_frank_wolfe(recipe, plan)


METHOD = LabelledFrankWolfeMethod(
    name="frank_wolfe",
    title="Frank-Wolfe merging",
    paper="Chen et al., FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization, ICCV 2025, "
          "arXiv:2503.12649",
    summary="Steps from a merge toward the checkpoints whose weights align best against the gradient of a "
            "labelled loss.",
    requires_base=True,
    operator=operator,
    params=PARAMS,
    check=check_params,
    check_model=check_learning_params,
    plan_learning=_plan_learning,
)
