"""PCB-Merging: weight every entry of every task vector by its importance, drop the least important, merge.

Paper: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
arXiv:2410.02396. Reference code: github.com/duguodong7/pcb-merging (`pcb-merging.py` and the
NLP scripts).

Notation: base θ₀, models θ₁ … θ_N, task vectors τᵢ = θᵢ − θ₀, r = `density` (the fraction kept),
ρ = `clamp_ratio`, wᵢ = `weight`. Norm(x) = (x − min x) / (max x − min x), the min–max normalisation of
the authors' code, taken over the scope (the whole model or one tensor). Norm of a constant vector
is 0 everywhere here, where the reference code divides 0 by 0.

0. Clamp outliers (ρ > 0): Aᵢ = clamp(|τᵢ|, loᵢ, hiᵢ), with loᵢ the ⌊ρd⌋-th and hiᵢ the
   (⌊(1 − ρ)d⌋ − 1)-th smallest |τᵢ| (0-based, d entries), and τ̃ᵢ = sign(τᵢ) · Aᵢ.
   With ρ = 0, τ̃ᵢ = τᵢ.

`variant: paper` (default), the formulas of the paper:

1. Intra-balancing: β_intra,i = Softmax(N · Norm(τ̃ᵢ ⊙ τ̃ᵢ)), the softmax over the scope's entries.
2. Inter-balancing: β_inter,i = Σⱼ Softmax(Norm(τ̃ᵢ ⊙ τ̃ⱼ)), j = 1 … N including i.
3. βᵢ = β_intra,i ⊙ β_inter,i.
4. Drop: mᵢ = 1[βᵢ ≥ qᵢ], qᵢ the k-th largest βᵢ with k = ⌊r·d⌋, so the k largest entries stay
   plus the ties at qᵢ. sᵢ = mᵢ ⊙ βᵢ.

`variant: reference`, what the reference code runs:

1. β_intra,i = exp(N · Norm(Aᵢ)²), with no softmax denominator.
2. β_inter,i = tanh(τᵢ ⊙ Σⱼ τⱼ), on the unclamped task vectors. It is negative where τᵢ opposes
   the sum.
3. βᵢ = β_intra,i ⊙ β_inter,i.
4. Drop: qᵢ is the ⌊(1 − r)d⌋-th smallest βᵢ (0-based) and sᵢ = Norm(clamp(βᵢ, qᵢ, max βᵢ)),
   a soft mask: 0 at and below qᵢ, rising linearly to 1 at the largest βᵢ.

Both variants then rescale and merge:

5. τ_m = Σᵢ wᵢ sᵢ ⊙ τ̃ᵢ / max(Σᵢ sᵢ, 1e−12), so a coordinate that every model drops gets 0.
6. θ = θ₀ + λ · τ_m.

`scope: model` (default, as the paper flattens every task vector into one) takes the norms,
softmax sums and quantiles over every merged tensor of the model. The executor finds them in
statistics passes before the merge (`BalanceStatistics`). `scope: tensor` takes them over each
tensor alone, by the same reducer run inside the operator.

Parameters:
    weight (per model, default 1.0): wᵢ in step 5, the per-task coefficient that the reference
        code's evolution-strategy variant searches.
    density (default 0.1, in [0, 1]): r, the fraction of entries each task vector keeps. 0 keeps
        none, so the merge returns the base.
    clamp_ratio (default 0.0, below 0.5): ρ. The reference scripts use 0.01 (vision and NLP) and
        1e−4 (the top-level file).
    lambda (default 1.0): scale of the merged task vector.
    variant (default "paper"): "paper" or "reference", see above.
    scope (default "model"): "model" or "tensor". One value for the whole merge, as are
        density, clamp_ratio and variant with `scope: model`.

Counts: ⌊x·d⌋ treats a product within float rounding of an integer as that integer, where the
reference code's int(d · x) may land one lower.

Not covered: the vision scripts' other inter-balancing terms (tanh(τᵢ ⊙ Σⱼ sign(τⱼ)·Norm(Aⱼ)) and
Σⱼ tanh(τ̂ᵢ ⊙ τ̂ⱼ)), and the evolution-strategy search of the per-task weights on validation data.
In a vocabulary tensor whose rows are matched by token, the pair terms τ̃ᵢ ⊙ τ̃ⱼ and the sum Σⱼ τⱼ
cover only the rows that both (or all) models hold. There N is the count of models that hold a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.base import MergeMethod, MergeTarget, ModelStatistics, Param, varying_param_problem
from mergekit_plus.methods.chunks import TaskVectors
from mergekit_plus.methods.linear import validate_inputs
from mergekit_plus.methods.sparsify import (
    SELECTION_HISTOGRAM_BYTES,
    MagnitudeSelection,
    keep_count,
    magnitude_keys,
)
from mergekit_plus.methods.task_arithmetic import LAMBDA, WEIGHT

VARIANTS = ("paper", "reference")
"""Choices of the `variant` parameter."""

SCOPES = ("model", "tensor")
"""Choices of the `scope` parameter: where the norms, softmax sums and quantiles are taken."""

# The reference code clamps the divisor of step 5 at this value.
_MIN_SCORE_SUM = 1e-12

_KEY_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def key_value(key: int, dtype: torch.dtype) -> float:
    """Return the non-negative float of `dtype` whose `magnitude_keys` value is `key`."""
    return float(torch.tensor([key], dtype=_KEY_DTYPES[dtype.itemsize]).view(dtype)[0])


def _radix_passes(dtype: torch.dtype) -> int:
    """Return the maximum number of passes of a `MagnitudeSelection` over values of `dtype`."""
    return 8 * dtype.itemsize // 16


class LargestMagnitude:
    """The exact k-th largest magnitude of values fed chunk by chunk, as a `magnitude_keys` value.

    k = 1 and k = numel take one pass (a running max or min). Otherwise a `MagnitudeSelection`
    runs its passes. When entries tie at its cut and straddle rank k, the cut is the exact value.
    Otherwise one more pass takes the smallest key at or above the cut, which is the k-th largest.
    """

    def __init__(self, k: int, numel: int, dtype: torch.dtype):
        if not 1 <= k <= numel:
            raise ValueError(f"the order statistic needs 1 ≤ k ≤ numel, got k={k} for {numel} entries")
        self.k = k
        self.numel = numel
        self.dtype = dtype
        self.key: int | None = None
        """The k-th largest magnitude's key, once `done`."""
        self._selection = MagnitudeSelection(k, numel, dtype) if 1 < k < numel else None
        self._cut: int | None = None
        self._running: int | None = None

    @property
    def done(self) -> bool:
        return self.key is not None

    @property
    def max_passes(self) -> int:
        return 1 if self._selection is None else _radix_passes(self.dtype) + 1

    @property
    def value(self) -> float:
        """The k-th largest magnitude, once `done`."""
        if self.key is None:
            raise RuntimeError("the order statistic is not found yet")
        return key_value(self.key, self.dtype)

    def count(self, values: torch.Tensor) -> None:
        """Add one contiguous chunk of the values to the current pass."""
        if values.numel() == 0:
            return
        if self._selection is not None and not self._selection.done:
            self._selection.count(values)
            return
        keys = magnitude_keys(values)
        if self._selection is None:
            found = int(keys.max() if self.k == 1 else keys.min())
            take_larger = self.k == 1
        else:
            above = keys[keys >= self._cut]
            if above.numel() == 0:
                return
            found = int(above.min())
            take_larger = False
        if self._running is None:
            self._running = found
        else:
            self._running = max(self._running, found) if take_larger else min(self._running, found)

    def finish_pass(self) -> None:
        if self._selection is None or self._cut is not None:
            if self._running is None:
                raise RuntimeError("the order statistic saw no values in its pass")
            self.key = self._running
            return
        self._selection.next_digit()
        if not self._selection.done:
            return
        cut, kept = self._selection.cut_with_ties()
        if kept > self.k:
            # Entries tie at the cut and straddle rank k, so the cut is an entry's key.
            self.key = self._selection.threshold
        else:
            self._cut = cut


@dataclass(frozen=True)
class PairNorm:
    """Min–max range and softmax normaliser of the pair product τ̃ᵢ ⊙ τ̃ⱼ over the scope (paper variant)."""

    low: float
    high: float
    log_normalizer: float
    """log(Σ exp(Norm(τ̃ᵢ ⊙ τ̃ⱼ)) / D), with D the largest entry count of any model."""


@dataclass(frozen=True)
class ModelBalance:
    """The statistics of one model's task vector over the scope, as the operator needs them."""

    model: int
    """The model's position in the recipe, which keys `pairs`."""
    variant: str
    numel: int
    clamp: tuple[float, float] | None
    """(loᵢ, hiᵢ) of |τᵢ|, or None when nothing is clamped (paper variant with ρ = 0)."""
    pairs: Mapping[int, PairNorm]
    """Paper variant: the pair statistics with every model j that shares entries with this one."""
    intra_log_normalizer: float
    """Paper variant: log(Σ exp(N · Norm(τ̃ᵢ ⊙ τ̃ᵢ)) / D)."""
    keep_none: bool
    """Whether the drop keeps no entry (density 0)."""
    score_key: int | None
    """Paper variant: entries with βᵢ's key at or above this stay; None keeps all."""
    score_floor: float
    """Reference variant: qᵢ, the ⌊(1 − r)d⌋-th smallest βᵢ."""
    score_max: float
    """Reference variant: the largest βᵢ."""
    kept: int | None
    """Entries the drop keeps, where known (paper variant)."""

    def describe(self) -> str:
        if self.keep_none:
            return "PCB keeps no task-vector entry (density 0)"
        clamp = "" if self.clamp is None else f", |τ| clamped to [{self.clamp[0]:.6g}, {self.clamp[1]:.6g}]"
        if self.kept is not None:
            return f"PCB keeps {self.kept:,} of {self.numel:,} task-vector entries{clamp}"
        return (f"PCB scores the {self.numel:,} task-vector entries from β > {self.score_floor:.6g} "
                f"up to β = {self.score_max:.6g}{clamp}")


def _normalize_(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Min–max normalise `values` in place with the scope's range; a constant range gives 0."""
    if high > low:
        return values.sub_(low).div_(high - low)
    return values.zero_()


def _clamped(delta: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    """Return τ̃ = sign(τ) · clamp(|τ|, lo, hi) as a new tensor, or a copy of τ without a clamp."""
    if clamp is None:
        return delta.clone()
    return delta.abs().clamp_(clamp[0], clamp[1]).mul_(torch.sign(delta))


def reference_balance(deltas: Sequence[torch.Tensor], clamps: Sequence[tuple[float, float]]) -> list[torch.Tensor]:
    """Return βᵢ = exp(N · Norm(Aᵢ)²) ⊙ tanh(τᵢ ⊙ Σⱼ τⱼ) for one chunk (reference variant)."""
    count = len(deltas)
    total = torch.stack(list(deltas)).sum(0)
    balances = []
    for delta, (low, high) in zip(deltas, clamps):
        intra = _normalize_(delta.abs().clamp_(low, high), low, high).square_().mul_(count).exp_()
        inter = torch.mul(delta, total).tanh_()
        balances.append(intra.mul_(inter))
    return balances


def paper_balance(tildes: Sequence[torch.Tensor], balances: Sequence[ModelBalance]) -> list[torch.Tensor]:
    """Return βᵢ = Softmax(N·Norm(τ̃ᵢ²)) ⊙ Σⱼ Softmax(Norm(τ̃ᵢ ⊙ τ̃ⱼ)) for one chunk, scaled by D (paper variant).

    The softmaxes are divided by their normalisers over the scope. D, the same for every model,
    cancels in step 5 and keeps the values near 1 in place of near 1/d.
    """
    count = len(tildes)
    products: dict[tuple[int, int], torch.Tensor] = {}
    for first in range(count):
        for second in range(first, count):
            pair = balances[first].pairs[balances[second].model]
            product = torch.mul(tildes[first], tildes[second])
            products[first, second] = _normalize_(product, pair.low, pair.high)

    results = []
    for first in range(count):
        intra = torch.mul(products[first, first], count).sub_(balances[first].intra_log_normalizer).exp_()
        inter = torch.zeros_like(intra)
        for second in range(count):
            pair = balances[first].pairs[balances[second].model]
            normalized = products[min(first, second), max(first, second)]
            inter.add_(torch.sub(normalized, pair.log_normalizer).exp_())
        results.append(intra.mul_(inter))
    return results


def _scores(betas: Sequence[torch.Tensor], balances: Sequence[ModelBalance]) -> list[torch.Tensor]:
    """Return the drop step's sᵢ for one chunk, overwriting the βᵢ."""
    scores = []
    for beta, balance in zip(betas, balances):
        if balance.keep_none:
            scores.append(beta.zero_())
        elif balance.variant == "reference":
            scores.append(_normalize_(beta.clamp_(balance.score_floor, balance.score_max),
                                      balance.score_floor, balance.score_max))
        elif balance.score_key is not None:
            scores.append(beta.mul_(magnitude_keys(beta) >= balance.score_key))
        else:
            scores.append(beta)
    return scores


class BalanceStatistics(ModelStatistics):
    """Finds, for each model, the norms, softmax normalisers and drop threshold of PCB over a scope.

    Stages, each one or more passes over every merged tensor:

    1. Clamp (reference variant always, paper variant with ρ > 0): loᵢ and hiᵢ of |τᵢ|, exact.
    2. Paper variant: the min and max of every pair product τ̃ᵢ ⊙ τ̃ⱼ (one pass), then the sums of
       the softmax exponentials (one pass), then the k-th largest βᵢ by radix select.
       Reference variant: the count of negative βᵢ and the largest βᵢ (one pass), then the
       ⌊(1 − r)d⌋-th smallest βᵢ, selected by magnitude among the negative or among the other
       entries.

    The state is a few numbers per model and pair, plus the histograms of the selections.
    """

    purpose = "the PCB norms, softmax sums and drop thresholds of each task vector"

    def __init__(self, *, variant: str, density: float, clamp_ratio: float, numels: Sequence[int],
                 compute_dtype: torch.dtype):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.density = density
        self.clamp_ratio = clamp_ratio
        self.numels = tuple(numels)
        self.compute_dtype = compute_dtype
        self._log_scale = math.log(max(max(self.numels, default=1), 1))
        self._stages = (["clamp"] if variant == "reference" or clamp_ratio > 0 else [])
        self._stages += ["pair ranges", "pair sums", "cut"] if variant == "paper" else ["signs", "cut"]
        self._stage = 0
        self._counted = [0] * len(self.numels)
        self._passes = 0

        self._clamp_stats: list[tuple[LargestMagnitude, LargestMagnitude] | None] = []
        for numel in self.numels:
            if "clamp" in self._stages and numel > 0:
                low_rank = numel - keep_count(clamp_ratio, numel)
                high_rank = numel - keep_count(1 - clamp_ratio, numel) + 1
                self._clamp_stats.append((LargestMagnitude(low_rank, numel, compute_dtype),
                                          LargestMagnitude(high_rank, numel, compute_dtype)))
            else:
                self._clamp_stats.append(None)
        self._clamps: list[tuple[float, float] | None] = [None] * len(self.numels)
        self._ranges: dict[tuple[int, int], list[float]] = {}
        self._sums: dict[tuple[int, int], float] = {}
        self._intra_sums: dict[int, float] = {}
        self._negatives = [0] * len(self.numels)
        self._maxima = [-math.inf] * len(self.numels)
        self._cuts: list[MagnitudeSelection | LargestMagnitude | None] = [None] * len(self.numels)
        self._cut_negative = [False] * len(self.numels)
        self._cut_results: list[tuple[int | None, int | None, float]] = [(None, None, 0.0)] * len(self.numels)
        self._keep_none = [density <= 0 or numel == 0 for numel in self.numels]

    @classmethod
    def for_targets(cls, targets: Sequence[MergeTarget], compute_dtype: torch.dtype) -> BalanceStatistics | None:
        """Return the reducer for a merge with `scope: model`, or None with `scope: tensor`."""
        if not targets or targets[0].params["scope"] != "model":
            return None
        params = targets[0].params
        count = len(targets[0].model_params)
        numels = [sum(target.model_numel[index] for target in targets) for index in range(count)]
        return cls(variant=params["variant"], density=params["density"], clamp_ratio=params["clamp_ratio"],
                   numels=numels, compute_dtype=compute_dtype)

    @property
    def done(self) -> bool:
        return self._stage >= len(self._stages)

    @property
    def max_passes(self) -> int:
        radix = _radix_passes(self.compute_dtype)
        total = 0
        for stage in self._stages:
            if stage == "clamp":
                total += max((max(low.max_passes, high.max_passes) for low, high in
                              (stats for stats in self._clamp_stats if stats is not None)), default=1)
            elif stage == "cut":
                total += radix if self.variant == "paper" else radix + 1
            else:
                total += 1
        return total

    @property
    def memory_bytes(self) -> int:
        return 2 * SELECTION_HISTOGRAM_BYTES * len(self.numels) + 64 * len(self.numels) ** 2

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
        """Add the task vectors of one tensor to the current pass."""
        if base is None:
            raise ValueError(f"pcb needs a base model tensor, got None for {name}")
        if self.done:
            raise RuntimeError("the PCB statistics are already complete")
        if base.numel() == 0:
            return
        if self._passes == 0:
            for model in models:
                self._counted[model] += base.numel()
        stage = self._stages[self._stage]
        inputs = TaskVectors(base, tensors, self.compute_dtype)
        for chunk in inputs.chunks():
            if stage == "clamp":
                self._update_clamp(chunk.deltas, models)
            elif stage == "pair ranges":
                self._update_pairs(chunk.deltas, models, sums=False)
            elif stage == "pair sums":
                self._update_pairs(chunk.deltas, models, sums=True)
            else:
                self._update_scores(chunk.deltas, models, count_signs=stage == "signs")

    def _update_clamp(self, deltas: Sequence[torch.Tensor], models: Sequence[int]) -> None:
        for delta, model in zip(deltas, models):
            for statistic in self._clamp_stats[model]:
                if not statistic.done:
                    statistic.count(delta)

    def _update_pairs(self, deltas: Sequence[torch.Tensor], models: Sequence[int], *, sums: bool) -> None:
        tildes = [_clamped(delta, self._clamps[model]) for delta, model in zip(deltas, models)]
        count = len(tildes)
        for first in range(count):
            for second in range(first, count):
                key = (min(models[first], models[second]), max(models[first], models[second]))
                product = torch.mul(tildes[first], tildes[second])
                if not sums:
                    low, high = torch.aminmax(product)
                    bounds = self._ranges.setdefault(key, [math.inf, -math.inf])
                    bounds[0] = min(bounds[0], float(low))
                    bounds[1] = max(bounds[1], float(high))
                    continue
                low, high = self._ranges[key]
                normalized = _normalize_(product, low, high)
                self._sums[key] = self._sums.get(key, 0.0) + float(torch.exp(normalized).sum(dtype=torch.float64))
                if first == second:
                    intra = float(normalized.mul_(count).exp_().sum(dtype=torch.float64))
                    self._intra_sums[models[first]] = self._intra_sums.get(models[first], 0.0) + intra

    def _update_scores(self, deltas: Sequence[torch.Tensor], models: Sequence[int], *, count_signs: bool) -> None:
        balances = [self._partial_balance(model) for model in models]
        if self.variant == "paper":
            betas = paper_balance([_clamped(delta, self._clamps[model]) for delta, model in zip(deltas, models)],
                                  balances)
        else:
            betas = reference_balance(deltas, [self._clamps[model] for model in models])
        for beta, model in zip(betas, models):
            if count_signs:
                self._negatives[model] += int(torch.count_nonzero(beta < 0))
                self._maxima[model] = max(self._maxima[model], float(beta.max()))
                continue
            cut = self._cuts[model]
            if cut is None or cut.done:
                continue
            if self.variant == "paper":
                cut.count(beta)
            else:
                cut.count(beta[beta < 0] if self._cut_negative[model] else beta[beta >= 0])

    def _partial_balance(self, model: int) -> ModelBalance:
        """Return what the passes found so far for `model`, enough to compute βᵢ in the last stages."""
        pairs = {}
        intra = 0.0
        if self.variant == "paper":
            for (first, second), (low, high) in self._ranges.items():
                if model in (first, second):
                    other = second if first == model else first
                    pairs[other] = PairNorm(low, high, math.log(self._sums[first, second]) - self._log_scale)
            if model in self._intra_sums:
                intra = math.log(self._intra_sums[model]) - self._log_scale
        return ModelBalance(model=model, variant=self.variant, numel=self.numels[model], clamp=self._clamps[model], pairs=pairs,
                            intra_log_normalizer=intra, keep_none=False, score_key=None, score_floor=0.0,
                            score_max=0.0, kept=None)

    def finish_pass(self) -> None:
        # The ranks of the order statistics assume the entry counts given up front, so a pass that
        # saw other counts would cut at the wrong place without this check.
        if self._passes == 0:
            for model, numel in enumerate(self.numels):
                if self._counted[model] != numel:
                    raise RuntimeError(f"the statistics pass saw {self._counted[model]} entries of the task vector "
                                       f"of model {model}, but the plan counts {numel}")
        self._passes += 1
        stage = self._stages[self._stage]
        if stage == "clamp":
            present = [statistics for statistics in self._clamp_stats if statistics is not None]
            for statistic in (statistic for statistics in present for statistic in statistics):
                if not statistic.done:
                    statistic.finish_pass()
            if not all(low.done and high.done for low, high in present):
                return
            self._clamps = [None if statistics is None else (statistics[0].value, statistics[1].value)
                            for statistics in self._clamp_stats]
        elif stage == "cut":
            pending = False
            for model, cut in enumerate(self._cuts):
                if cut is not None and not cut.done:
                    if isinstance(cut, LargestMagnitude):
                        cut.finish_pass()
                    else:
                        cut.next_digit()
                    pending |= not cut.done
            if pending:
                return
            self._finish_cut()

        self._advance()

    def _advance(self) -> None:
        """Move to the next stage. A cut stage with nothing to select finishes at once, with no pass."""
        self._stage += 1
        if not self.done and self._stages[self._stage] == "cut":
            self._start_cut()
            if all(cut is None for cut in self._cuts):
                self._finish_cut()
                self._stage += 1

    def _start_cut(self) -> None:
        for model, numel in enumerate(self.numels):
            if self._keep_none[model]:
                continue
            if self.variant == "paper":
                kept = keep_count(self.density, numel)
                self._keep_none[model] = kept == 0
                self._cuts[model] = MagnitudeSelection(kept, numel, self.compute_dtype) if 0 < kept < numel else None
                continue
            # The ⌊(1 − r)d⌋-th smallest β (0-based): among the negative entries it is the
            # (index + 1)-th largest magnitude, among the others the (d − index)-th largest.
            index = keep_count(1 - self.density, numel)
            if index >= numel:
                # A density below float rounding of 1/d leaves no index inside the vector.
                self._keep_none[model] = True
                continue
            negatives = self._negatives[model]
            self._cut_negative[model] = index < negatives
            if index < negatives:
                self._cuts[model] = LargestMagnitude(index + 1, negatives, self.compute_dtype)
            else:
                self._cuts[model] = LargestMagnitude(numel - index, numel - negatives, self.compute_dtype)

    def _finish_cut(self) -> None:
        for model, numel in enumerate(self.numels):
            cut = self._cuts[model]
            if self.variant == "paper":
                kept = keep_count(self.density, numel)
                if cut is not None:
                    key, kept = cut.cut_with_ties()
                    self._cut_results[model] = (key, kept, 0.0)
                else:
                    # Every entry stays, or none does (`keep_none` below).
                    self._cut_results[model] = (None, kept, 0.0)
            elif cut is not None:
                floor = -cut.value if self._cut_negative[model] else cut.value
                self._cut_results[model] = (None, None, floor)

    def result(self) -> tuple[ModelBalance, ...]:
        if not self.done:
            raise RuntimeError("the PCB statistics are not found yet: run the statistics passes first")
        results = []
        for model, numel in enumerate(self.numels):
            partial = self._partial_balance(model)
            key, kept, floor = self._cut_results[model]
            keep_none = self._keep_none[model]
            results.append(ModelBalance(
                model=model, variant=self.variant, numel=numel, clamp=partial.clamp, pairs=partial.pairs,
                intra_log_normalizer=partial.intra_log_normalizer, keep_none=keep_none, score_key=key,
                score_floor=floor, score_max=self._maxima[model], kept=kept))
        return tuple(results)

    def describe(self) -> list[str]:
        return [balance.describe() for balance in self.result()]


def check_model_scope(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that `scope` is one value, and that with `scope: model` the whole-model parameters are too."""
    problems = []
    names = ("scope", "variant", "density", "clamp_ratio")
    for name in names:
        if name != "scope" and (not targets or targets[0].params["scope"] != "model"):
            continue
        if name == "scope":
            problem = varying_param_problem(targets, name)
        else:
            problem = varying_param_problem(targets, name, "`scope: model` balances each task vector over the whole "
                                            "model with one value", ", or set `scope: tensor`")
        if problem is not None:
            problems.append(problem)
            if name == "scope":
                return problems
    return problems


def check_params(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Check the clamp ratio, which must leave lo below hi."""
    if params["clamp_ratio"] >= 0.5:
        return [f"`clamp_ratio` is {params['clamp_ratio']:g}, but it must be below 0.5, because it clamps that "
                "fraction of |τ| at each end; the reference scripts use 0.01"]
    return []


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
    statistics: Sequence[ModelBalance] | None = None,
) -> torch.Tensor:
    """Return θ₀ + λ · τ_m, the PCB merge of the task vectors. `seeds` is unused.

    With `scope: model`, `statistics` gives each model's whole-model `ModelBalance`. With
    `scope: tensor` it must be None, and the operator runs `BalanceStatistics` over this tensor
    alone (two to seven passes), then merges in one more pass, chunk by chunk.
    """
    if base is None:
        raise ValueError("pcb needs a base model tensor, got None")
    validate_inputs(base, tensors, model_params)
    if params["variant"] not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {params['variant']!r}")
    inputs = TaskVectors(base, tensors, compute_dtype)
    balances = _balances(params, inputs, base, tensors, model_params, statistics)

    weights = [mp["weight"] for mp in model_params]
    output = inputs.empty_output()
    for chunk in inputs.chunks():
        tildes = [_clamped(delta, balance.clamp) for delta, balance in zip(chunk.deltas, balances)]
        if params["variant"] == "paper":
            betas = paper_balance(tildes, balances)
        else:
            betas = reference_balance(chunk.deltas, [balance.clamp for balance in balances])
        scores = _scores(betas, balances)

        numerator = torch.zeros_like(chunk.base)
        denominator = torch.zeros_like(chunk.base)
        for score, tilde, weight in zip(scores, tildes, weights):
            numerator.addcmul_(score, tilde, value=weight)
            denominator.add_(score)
        merged = numerator.div_(denominator.clamp_(min=_MIN_SCORE_SUM))
        torch.add(chunk.base, merged, alpha=params["lambda"], out=output[chunk.start : chunk.stop])
    return output.view(inputs.shape)


def _balances(
    params: Mapping[str, Any],
    inputs: TaskVectors,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[Mapping[str, Any]],
    statistics: Sequence[ModelBalance] | None,
) -> Sequence[ModelBalance]:
    scope = params["scope"]
    if scope == "tensor":
        if statistics is not None:
            raise ValueError("pcb with scope `tensor` takes no whole-model statistics, but got some")
        reducer = BalanceStatistics(variant=params["variant"], density=params["density"],
                                    clamp_ratio=params["clamp_ratio"], numels=[inputs.numel] * inputs.count,
                                    compute_dtype=inputs.compute_dtype)
        while not reducer.done:
            reducer.update("tensor", base, tensors, models=range(inputs.count), params=params,
                           model_params=model_params)
            reducer.finish_pass()
        return reducer.result()
    if scope != "model":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if statistics is None:
        raise ValueError("pcb with scope `model` needs the whole-model PCB statistics as `statistics`, got None; "
                         "the executor finds them with `BalanceStatistics` before the merge")
    if len(statistics) != inputs.count:
        raise ValueError(f"pcb needs one statistics entry per model: got {len(statistics)} for {inputs.count} models")
    return statistics


METHOD = MergeMethod(
    name="pcb",
    title="PCB-Merging",
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024, arXiv:2410.02396",
    summary="Weights each task-vector entry by its importance within and across tasks, drops the least "
            "important, and averages the rest with those weights.",
    requires_base=True,
    operator=operator,
    params=(
        WEIGHT,
        Param("density", float, 0.1, "Fraction r of each task vector's entries kept by the drop step, highest "
              "balance scores first.", minimum=0.0, maximum=1.0),
        Param("clamp_ratio", float, 0.0, "Fraction of |τ| clamped at each end before balancing (ρ); below 0.5. "
              "The reference scripts use 0.01.", minimum=0.0, maximum=0.5),
        LAMBDA,
        Param("variant", str, "paper", 'The formulas: "paper" (softmax balancing, hard top-r drop) or '
              '"reference" (the authors\' code: tanh inter-balancing, soft top-r drop).', choices=VARIANTS),
        Param("scope", str, "model", 'Where norms, softmax sums and quantiles are taken: "model" over the whole '
              'model flattened into one vector (the paper), which reads the inputs several more times before '
              'merging; "tensor" within each tensor. One value for the whole merge.', choices=SCOPES),
    ),
    check=check_params,
    check_model=check_model_scope,
    statistics=BalanceStatistics.for_targets,
)
