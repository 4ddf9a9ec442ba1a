"""TALL masks: the per-task masks that localize each task's information in a multi-task vector.

Paper: Wang, Dimitriadis et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, arXiv:2405.07813. The same paper defines Consensus Merging
(`methods/consensus.py`), which builds on these masks.

With base θ₀, models θ₁ … θ_T and task vectors τ_t = θ_t − θ₀:

1. Multi-task vector τ_MTL: `inner: task_arithmetic` (the default) takes the unscaled sum Σ τ_t.
   `inner: ties` takes the TIES merge of the τ_t before its λ (trim to `density`, elect signs,
   disjoint sum with `normalize: false`, the paper's setting), with the `scope` and the
   whole-model trim thresholds of `methods/ties.py`.
2. Mask of task t: m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|], with a strict ">". Each λ_t is the
   per-model parameter `mask_lambda`. The paper picks it per task on that task's validation data
   from {0.2, 0.3, 0.4, 0.5, 0.6}, and the default 0.4 is the middle of that grid. With
   `mask_lambda: auto`, the `tall_masks` method does the same: for each λ of `lambda_grid` it
   scores θ₀ + m_t(λ) ⊙ τ_MTL on task t's `data:` file and keeps the best λ (`io/bundle.py` runs
   that phase, `select_lambda` below decides).

3. The `tall_masks` method (`METHOD` below) stores θ₀, τ_MTL and every m_t bit-packed in a bundle
   folder (`io/bundle.py`), and `merge extract` rebuilds θ̂_t = θ₀ + m_t ⊙ τ_MTL.

The masks compare the raw task vectors τ_t, not their TIES-trimmed versions, as the authors'
code does. FusionBench's `TallMaskTaskArithmeticAlgorithm` compares |θ₀ − τ_t| on the left-hand
side instead of |τ_t|. That is a slip, so this module does not offer it as an option.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, MergeTarget, Param, varying_param_problem
from mergekit_plus.methods.chunks import Chunk, ChunkScratch, TaskVectors, chunk_bounds
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.sparsify import SIGN_ELECTIONS, consensus_merge
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

INNERS = ("task_arithmetic", "ties")
"""Choices of the `inner` parameter: how the multi-task vector τ_MTL is made."""

DEFAULT_MASK_LAMBDA = 0.4

MASK_LAMBDA = Param(
    "mask_lambda",
    float,
    DEFAULT_MASK_LAMBDA,
    "λ_t of this task's TALL mask: an entry belongs to the task where |τ_t| > λ_t · |τ_MTL − τ_t|. "
    "The paper picks it per task from 0.2 to 0.6 on validation data.",
    per_model=True,
    minimum=0.0,
)
INNER = Param(
    "inner",
    str,
    "task_arithmetic",
    'How the multi-task vector τ_MTL is made: "task_arithmetic" sums the task vectors, "ties" merges '
    "them with TIES (trim to `density`, elect signs, disjoint sum). One value for the whole merge.",
    choices=INNERS,
)
TIES_DENSITY = Param(
    "density",
    float,
    0.2,
    "With `inner: ties`: fraction of this model's task-vector entries kept by the TIES trim.",
    per_model=True,
    minimum=0.0,
    maximum=1.0,
)
TIES_NORMALIZE = Param(
    "normalize",
    bool,
    False,
    "With `inner: ties`: divide by the number of agreeing models (disjoint mean) instead of the "
    "paper's disjoint sum.",
)
TIES_SIGN_ELECTION = Param(
    "sign_election",
    str,
    "trimmed",
    'With `inner: ties`: "trimmed" elects the sign of the sum of the trimmed task vectors (TIES paper), '
    '"weighted" the sign of their weighted sum (mergekit). All weights are 1 here, so both agree.',
    choices=SIGN_ELECTIONS,
)
TIES_SCOPE = Param(
    "scope",
    str,
    "model",
    'With `inner: ties`: where the trim ranks each task vector\'s entries, "model" over the whole model '
    '(TIES paper, one more statistics pass) or "tensor" within each tensor (mergekit).',
    choices=SCOPES,
)

INNER_PARAMS = (INNER, TIES_DENSITY, TIES_NORMALIZE, TIES_SIGN_ELECTION, TIES_SCOPE)
"""The parameters that choose τ_MTL, shared by every method built on TALL masks."""


def check_inner_params(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Reject TIES settings that differ from their defaults when `inner` is task_arithmetic.

    A setting equal to its default cannot be distinguished from an unset one, so only those that
    would change the result under `inner: ties` are caught.
    """
    if params["inner"] != "task_arithmetic":
        return []
    changed = [param.name for param in (TIES_NORMALIZE, TIES_SIGN_ELECTION, TIES_SCOPE)
               if params[param.name] != param.default]
    if any(values["density"] != TIES_DENSITY.default for values in model_params):
        changed.append("density")
    if not changed:
        return []
    names = ", ".join(f"`{name}`" for name in changed)
    verb = "applies" if len(changed) == 1 else "apply"
    return [f"{names} {verb} only with `inner: ties`, but `inner` is task_arithmetic; "
            "remove them or set `inner: ties`"]


def check_inner_is_uniform(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that `inner` is one value for the whole merge."""
    problem = varying_param_problem(targets, "inner")
    return [] if problem is None else [problem]


def multi_task_vector(
    inputs: TaskVectors,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    statistics: Sequence[ModelThreshold | None] | None,
) -> torch.Tensor:
    """Return τ_MTL of one tensor as a new flat tensor in the compute dtype.

    `statistics` contains the whole-model TIES trim thresholds with `inner: ties` and `scope: model`,
    and is ignored otherwise.
    """
    inner = params["inner"]
    if inner == "task_arithmetic":
        output = inputs.empty_output()
        for chunk in inputs.chunks():
            total = output[chunk.start : chunk.stop].copy_(chunk.deltas[0])
            for delta in chunk.deltas[1:]:
                total.add_(delta)
        return output
    if inner != "ties":
        raise ValueError(f"inner must be one of {INNERS}, got {inner!r}")

    trims = _ties_trims(params["scope"], inputs, model_params, statistics)
    find_thresholds(inputs, trims)
    # consensus_merge adds the base to the merged vector, so a zero base leaves τ_MTL itself.
    return consensus_merge(
        lambda: _with_zero_base(trimmed_chunks(inputs, trims), inputs.scratch),
        inputs.empty_output(),
        [1.0] * inputs.count,
        sign_election=params["sign_election"],
        normalize=params["normalize"],
        scale=1.0,
        scratch=inputs.scratch,
    )


def _with_zero_base(chunks: Iterator[Chunk], scratch: ChunkScratch) -> Iterator[Chunk]:
    for chunk in chunks:
        zeros = scratch.get("zero base", chunk.base.dtype, chunk.stop - chunk.start).zero_()
        yield Chunk(chunk.start, chunk.stop, zeros, chunk.deltas)


def _ties_trims(
    scope: str,
    inputs: TaskVectors,
    model_params: Sequence[Mapping[str, Any]],
    statistics: Sequence[ModelThreshold | None] | None,
) -> list[Trim] | list[ThresholdTrim]:
    if scope == "tensor":
        return [Trim(values["density"], inputs.numel, inputs.compute_dtype) for values in model_params]
    if scope != "model":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if statistics is None or len(statistics) != inputs.count or any(entry is None for entry in statistics):
        raise ValueError("`inner: ties` with `scope: model` needs one whole-model trim threshold per model as "
                         "`statistics`; the executor finds them in statistics passes before the merge")
    return [ThresholdTrim(threshold) for threshold in statistics]


def task_masks(
    deltas: Sequence[torch.Tensor],
    multi_task: torch.Tensor,
    lambdas: Sequence[float],
    scratch: ChunkScratch | None = None,
) -> list[torch.Tensor]:
    """Return the TALL mask m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|] of each task vector, as bool tensors.

    All inputs are in one dtype and shape. With `scratch`, the masks are buffers that the next
    call overwrites.
    """
    masks = []
    for index, (delta, mask_lambda) in enumerate(zip(deltas, lambdas, strict=True)):
        distance = _buffer(scratch, "distance", delta).copy_(multi_task).sub_(delta).abs_().mul_(mask_lambda)
        magnitude = torch.abs(delta, out=_buffer(scratch, "magnitude", delta))
        mask = _buffer(scratch, f"mask {index}", delta, dtype=torch.bool)
        masks.append(torch.gt(magnitude, distance, out=mask))
    return masks


def mask_counts(masks: Sequence[torch.Tensor], scratch: ChunkScratch | None = None) -> torch.Tensor:
    """Return, per entry, how many of `masks` keep it, as int16."""
    counts = _buffer(scratch, "mask counts", masks[0], dtype=torch.int16).zero_()
    for mask in masks:
        counts.add_(mask)
    return counts


def _buffer(scratch: ChunkScratch | None, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if scratch is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return scratch.get(name, dtype, like.numel()).view(like.shape)


# The `tall_masks` method: a compressed multi-task bundle instead of one merged model.
#
# The bundle stores θ₀, τ_MTL and one bit-packed mask m_t per task, and `merge extract` rebuilds
# θ_t = θ₀ + m_t ⊙ τ_MTL (coefficient 1, as in the paper). The folder format lives in `io/bundle.py`.

BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
"""Weight of each of the 8 entries in a packed byte: the first entry is the most significant bit,
as `numpy.packbits` packs by default."""

PER_TASK_MODELS = Param(
    "per_task_models",
    bool,
    False,
    "Also write every task's rebuilt model θ₀ + m_t ⊙ τ_MTL as a Hugging Face folder under "
    "`models/TASK/` inside the bundle folder.",
)


# Choosing λ_t per task on labelled data (`mask_lambda: auto`)

AUTO = "auto"
"""The `mask_lambda` keyword that has the `tall_masks` method choose λ_t on the task's data."""

PAPER_LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
TIE_BREAKS = ("nearest_default", "first")
"""Choices of `lambda_tie_break`: the grid value nearest the default 0.4, or the first in grid order."""


@dataclass(frozen=True)
class KeywordParam(Param):
    """A number parameter that also takes one of `keywords` in place of a number (not inside a gradient list)."""

    keywords: tuple[str, ...] = ()


SELECTABLE_MASK_LAMBDA = KeywordParam(
    "mask_lambda",
    float,
    DEFAULT_MASK_LAMBDA,
    "λ_t of this task's TALL mask: an entry belongs to the task where |τ_t| > λ_t · |τ_MTL − τ_t|. "
    "`auto` chooses it from `lambda_grid` by the task's score on its `data:` file, as the paper does "
    "on validation data.",
    per_model=True,
    minimum=0.0,
    keywords=(AUTO,),
)
LAMBDA_GRID = Param(
    "lambda_grid",
    str,
    ", ".join(str(value) for value in PAPER_LAMBDA_GRID),
    "With `mask_lambda: auto`: the λ values to try, as one string of numbers separated by commas. "
    "The default is the paper's grid.",
)
LAMBDA_TIE_BREAK = Param(
    "lambda_tie_break",
    str,
    "nearest_default",
    "With `mask_lambda: auto`: which of several equally scoring λ to keep. \"nearest_default\" keeps the "
    "one nearest 0.4 (the smaller of two equally near), \"first\" the first in `lambda_grid` order, as "
    "the authors' code does.",
    choices=TIE_BREAKS,
)


def parse_lambda_grid(text: str) -> tuple[float, ...]:
    """Parse `lambda_grid`: distinct finite numbers of at least 0, separated by commas. Raise ValueError."""
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"`lambda_grid` must be numbers separated by commas, such as \"0.2, 0.3, 0.4\", "
                             f"got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"`lambda_grid` values must be finite and at least 0, got {part.strip()} in {text!r}")
        if value in values:
            raise ValueError(f"`lambda_grid` lists {part.strip()} twice in {text!r}; list each value once")
        values.append(value)
    return tuple(values)


def choose_lambda(scores: Sequence[tuple[float, float]], *, tie_break: str = "nearest_default",
                  default: float = DEFAULT_MASK_LAMBDA) -> float:
    """Return the λ of the best score among (λ, score) pairs in grid order.

    Of several λ with the best score, "nearest_default" keeps the one nearest `default`, and the
    smaller of two equally near ones. "first" keeps the first in grid order.
    """
    if not scores:
        raise ValueError("choose_lambda needs at least one (λ, score) pair")
    best = max(score for _, score in scores)
    tied = [value for value, score in scores if score == best]
    if tie_break == "first":
        return tied[0]
    if tie_break != "nearest_default":
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    # Rounded, so that grid values written in decimals (0.3 and 0.5 around 0.4) count as equally near.
    return min(tied, key=lambda value: (round(abs(value - default), 9), value))


def select_lambda(grid: Sequence[float], score: Callable[[float], float], *,
                  tie_break: str = "nearest_default") -> tuple[float, list[tuple[float, float]]]:
    """Score every λ of `grid` with `score` (higher is better); return the chosen λ and the (λ, score) pairs."""
    scores = [(value, score(value)) for value in grid]
    return choose_lambda(scores, tie_break=tie_break), scores


def rebuild_task(
    base: torch.Tensor,
    task_tensor: torch.Tensor,
    multi_task: torch.Tensor,
    mask_lambda: float,
    *,
    compute_dtype: torch.dtype = torch.float32,
    stored_dtype: torch.dtype | None = None,
    stored_multi_task: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return θ₀ + m_t ⊙ τ_MTL of one tensor in `compute_dtype`, m_t from `task_tensor` at `mask_lambda`.

    The mask compares τ_t = `task_tensor` − `base` with `multi_task` (τ_MTL in the compute dtype)
    as `bundle_entry` does. The sum takes τ_MTL as the bundle stores it: `stored_multi_task` where
    clamping to the output dtype changed it, else `multi_task`. With `stored_dtype`, θ₀ and that
    τ_MTL are first rounded to it, so that the result equals what `merge extract` rebuilds. Only
    chunk-sized buffers exist besides the result.
    """
    inputs = TaskVectors(base, [task_tensor], compute_dtype)
    flat_tau = multi_task.reshape(-1)
    summand = flat_tau if stored_multi_task is None else stored_multi_task.reshape(-1)
    result = base.to(compute_dtype, copy=True).reshape(-1)
    if stored_dtype is not None:
        result = result.to(stored_dtype).to(compute_dtype)
        summand = summand.to(stored_dtype)
    for chunk in inputs.chunks():
        mask = task_masks(chunk.deltas, flat_tau[chunk.start : chunk.stop], [mask_lambda], inputs.scratch)[0]
        result[chunk.start : chunk.stop].addcmul_(summand[chunk.start : chunk.stop].to(compute_dtype),
                                                  mask.to(compute_dtype))
    return result.view(inputs.shape)


def searched_models(targets: Sequence[MergeTarget]) -> list[int]:
    """Return the positions of the models whose `mask_lambda` is `auto` for at least one tensor."""
    count = len(targets[0].model_params) if targets else 0
    return [index for index in range(count) if any(target.model_params[index]["mask_lambda"] == AUTO
                                                   for target in targets)]


def _check_lambda_selection(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that the λ selection settings are single values, used, and that `lambda_grid` parses."""
    problems = []
    for param in (LAMBDA_GRID, LAMBDA_TIE_BREAK):
        values = {target.params[param.name] for target in targets}
        if problem := varying_param_problem(targets, param.name):
            problems.append(problem)
        elif targets and not searched_models(targets) and next(iter(values)) != param.default:
            problems.append(f"`{param.name}` applies only with `mask_lambda: auto`, but no model's `mask_lambda` "
                            "is auto; remove it or set `mask_lambda: auto`")
    for grid in sorted({target.params[LAMBDA_GRID.name] for target in targets}):
        try:
            parse_lambda_grid(grid)
        except ValueError as error:
            problems.append(str(error))
    return problems


def packed_size(numel: int) -> int:
    """Return the number of bytes that `numel` mask entries take when packed 8 to a byte."""
    return (numel + 7) // 8


def pack_mask(mask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 entries per byte in flat (row-major) order.

    The byte order matches `numpy.packbits(mask.ravel())`: entry 8·i + j is bit 7 − j of byte i,
    and the last byte is padded with zero bits.
    """
    flat = mask.reshape(-1)
    size = packed_size(flat.numel())
    padded = torch.zeros(size * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    # Eight distinct powers of two sum to at most 255, so the uint8 sum cannot overflow.
    packed = padded.view(size, 8).mul_(weights).sum(dim=1, dtype=torch.uint8)
    if out is None:
        return packed
    return out.copy_(packed)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Unpack the first `numel` entries of a mask packed by `pack_mask`, as a flat bool tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"a packed mask is a 1-D uint8 tensor, got {packed.dtype} with shape {list(packed.shape)}")
    if packed.numel() != packed_size(numel):
        raise ValueError(f"a packed mask of {numel} entries has {packed_size(numel)} bytes, got {packed.numel()}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1)
    return bits.reshape(-1)[:numel].bool()


@dataclass(frozen=True)
class BundleEntry:
    """Bundle contents for one merged tensor: τ_MTL and each task's packed mask."""

    multi_task: torch.Tensor
    """τ_MTL in the compute dtype, shaped like the input tensor."""
    masks: tuple[torch.Tensor, ...]
    """One packed mask per task (`pack_mask` order), 1-D uint8 of `packed_size(numel)` bytes."""
    kept: tuple[int, ...]
    """How many entries each task's mask keeps."""


def bundle_entry(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    compute_dtype: torch.dtype = torch.float32,
    statistics: Sequence[ModelThreshold | None] | None = None,
) -> BundleEntry:
    """Compute τ_MTL and the packed TALL mask of every task for one tensor.

    The inputs are in their stored dtypes and are not changed. Besides τ_MTL and the packed masks
    (1/8 byte per entry and task), only chunk-sized buffers exist.
    """
    validate_inputs(base, tensors, model_params)
    lambdas = [values["mask_lambda"] for values in model_params]
    if AUTO in lambdas:
        raise ValueError("mask_lambda is auto for this tensor: the λ selection phase sets λ_t on the data "
                         "before the bundle pass")
    inputs = TaskVectors(base, tensors, compute_dtype)
    multi_task = multi_task_vector(inputs, params, model_params, statistics)

    packed = [torch.empty(packed_size(inputs.numel), dtype=torch.uint8, device=inputs.device) for _ in tensors]
    kept = [0] * len(tensors)
    # CHUNK_NUMEL is a multiple of 8, so every chunk but the last fills whole bytes.
    for chunk in inputs.chunks():
        masks = task_masks(chunk.deltas, multi_task[chunk.start : chunk.stop], lambdas, inputs.scratch)
        first, last = chunk.start // 8, packed_size(chunk.stop)
        for index, mask in enumerate(masks):
            pack_mask(mask, out=packed[index][first:last])
            kept[index] += int(torch.count_nonzero(mask))
    return BundleEntry(multi_task.view(inputs.shape), tuple(packed), tuple(kept))


def apply_mask(
    base: torch.Tensor,
    multi_task: torch.Tensor,
    packed: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return θ₀ + m ⊙ τ_MTL in `compute_dtype`, with m unpacked from `packed` chunk by chunk."""
    if base.shape != multi_task.shape:
        raise ValueError(f"base shape {list(base.shape)} differs from τ_MTL shape {list(multi_task.shape)}")
    numel = base.numel()
    if packed.numel() != packed_size(numel):
        raise ValueError(f"a packed mask of {numel} entries has {packed_size(numel)} bytes, got {packed.numel()}")
    result = base.to(compute_dtype, copy=True).reshape(-1)
    flat_tau = multi_task.reshape(-1)
    for start, stop in chunk_bounds(numel):
        mask = unpack_mask(packed[start // 8 : packed_size(stop)], stop - start)
        result[start:stop].addcmul_(flat_tau[start:stop].to(compute_dtype), mask.to(compute_dtype))
    return result.view(base.shape)


def bundle_operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
    statistics: Sequence[ModelThreshold | None] | None = None,
) -> torch.Tensor:
    """Reject a call as an ordinary merge operator: `tall_masks` writes a bundle, not one tensor."""
    raise NotImplementedError("tall_masks has no single merged tensor: the executor writes a bundle of θ₀, τ_MTL "
                              "and the task masks with `bundle_entry`, and `merge extract` rebuilds each task")


@dataclass(frozen=True)
class BundleMergeMethod(MergeMethod):
    """A merge method whose output is a multi-task bundle folder rather than one checkpoint."""

    output_kind: str = "bundle"
    plan_learning: Callable[..., Any] | None = None
    """Return the λ_t selection phase of a plan (`io.bundle.LambdaSelection`), or None without `data:`.
    Called by the planner with (recipe, plan)."""
    uses_data: bool = True


def _tall_masks_statistics(targets: Sequence[MergeTarget], compute_dtype: torch.dtype) -> TrimThresholds | None:
    """Return the whole-model TIES trim reducer for `inner: ties` with `scope: model`, else None."""
    if not targets or targets[0].params["inner"] != "ties":
        return None
    return TrimThresholds.for_targets(targets, compute_dtype)


def _check_tall_masks_model(targets: Sequence[MergeTarget]) -> list[str]:
    problems = check_inner_is_uniform(targets) + _check_lambda_selection(targets)
    if problem := varying_param_problem(targets, "per_task_models"):
        problems.append(problem)
    if problems or not targets or targets[0].params["inner"] != "ties":
        return problems
    return check_model_scope(targets)


def _plan_lambda_selection(recipe: Any, plan: Any) -> Any:
    from mergekit_plus.io.bundle import plan_lambda_selection

    return plan_lambda_selection(recipe, plan)


METHOD = BundleMergeMethod(
    name="tall_masks",
    title="TALL masks (multi-task bundle)",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024, "
          "arXiv:2405.07813",
    summary="Writes θ₀, the multi-task vector τ_MTL and one bit-packed TALL mask per task; `merge extract` "
            "rebuilds each task's model θ₀ + m_t ⊙ τ_MTL.",
    requires_base=True,
    operator=bundle_operator,
    params=(SELECTABLE_MASK_LAMBDA, LAMBDA_GRID, LAMBDA_TIE_BREAK, *INNER_PARAMS, PER_TASK_MODELS),
    check=check_inner_params,
    check_model=_check_tall_masks_model,
    statistics=_tall_masks_statistics,
    plan_learning=_plan_lambda_selection,
)
