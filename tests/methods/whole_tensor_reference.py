"""Whole-tensor reference merges: the operators as they were before they worked in chunks.

Each reference converts every input to the compute dtype up front and then runs the same torch
operations, in the same order, on whole tensors, so the chunked operators must match it bit
for bit. The trim mask comes from a stable sort instead of the radix select, so the reference
shares no selection code with the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_plus.methods.sparsify import keep_count

_INT_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_RANDOM_BLOCK = 1 << 20


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Return the IEEE bit patterns of a float tensor, so that −0.0 and +0.0 compare unequal."""
    return tensor.contiguous().view(_INT_DTYPES[tensor.element_size()])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    differing = int((bits(actual) != bits(expected)).sum())
    assert differing == 0, f"{differing} of {expected.numel()} entries differ"


def sorted_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of the k largest |x| by a stable descending sort, so ties keep the lowest flat index."""
    keys = bits(values).reshape(-1) & ((1 << (8 * values.element_size() - 1)) - 1)
    order = torch.sort(keys, descending=True, stable=True).indices[: max(k, 0)]
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(values.shape)


def random_keep_mask(shape: torch.Size, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    numel = math.prod(shape)
    keep = torch.empty(numel, dtype=torch.bool)
    for start in range(0, numel, _RANDOM_BLOCK):
        stop = min(numel, start + _RANDOM_BLOCK)
        uniform = torch.rand(stop - start, generator=generator, dtype=torch.float32)
        torch.lt(uniform, density, out=keep[start:stop])
    return keep.view(shape)


def _elect_signs(deltas: Sequence[torch.Tensor], weights: Sequence[float], sign_election: str) -> torch.Tensor:
    weighted = sign_election == "weighted"
    total = deltas[0] * weights[0] if weighted else deltas[0].clone()
    for delta, weight in zip(deltas[1:], weights[1:]):
        total.add_(delta, alpha=weight if weighted else 1)
    positive = int(torch.count_nonzero(total > 0))
    negative = int(torch.count_nonzero(total < 0))
    majority = 1 if positive >= negative else -1
    return total.sign_().mul_(2).add_(majority).clamp_(-1, 1)


def _disjoint_merge(
    deltas: list[torch.Tensor], weights: Sequence[float], sign_election: str, normalize: bool
) -> torch.Tensor:
    signs = _elect_signs(deltas, weights, sign_election)
    agreeing = deltas[0].mul_(signs).clamp_(min=0)
    denominator = agreeing.sign().mul_(weights[0]) if normalize else None
    numerator = agreeing.mul_(signs).mul_(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        agreeing = delta.mul_(signs).clamp_(min=0)
        numerator.addcmul_(agreeing, signs, value=weight)
        if denominator is not None:
            denominator.add_(agreeing.sign_(), alpha=weight)
    if denominator is None:
        return numerator
    empty = denominator == 0
    denominator.masked_fill_(empty, 1)
    return numerator.div_(denominator).masked_fill_(empty, 0)


def _weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    merged = None
    for delta, weight in zip(deltas, weights):
        delta.mul_(weight)
        merged = delta if merged is None else merged.add_(delta)
    if normalize:
        merged.div_(math.fsum(weights))
    return merged


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = keep_count(density, delta.numel())
    if k == 0:
        return delta.zero_()
    if k < delta.numel():
        delta.mul_(sorted_top_k(delta, k))
    return delta


def _trim_at(delta: torch.Tensor, threshold: Any) -> torch.Tensor:
    """Trim at a whole-model threshold: keep the entries whose magnitude key is at least its `minimum_key`."""
    if threshold.kept_count == 0:
        return delta.zero_()
    if threshold.minimum_key is not None:
        keys = bits(delta) & ((1 << (8 * delta.element_size() - 1)) - 1)
        delta.mul_(keys >= threshold.minimum_key)
    return delta


def _drop(delta: torch.Tensor, density: float, seed: int, rescale: bool) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    delta.mul_(random_keep_mask(delta.shape, density, seed))
    if rescale:
        delta.div_(density)
    return delta


def merge(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype,
    statistics: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Merge like the registered method `method`, on whole tensors converted up front.

    For ties with `scope: model`, `statistics` gives each model's whole-model trim threshold.
    """
    models = [tensor.to(compute_dtype) for tensor in tensors]
    weights = [mp["weight"] for mp in model_params]
    if method == "linear":
        merged = models[0] * weights[0]
        for model, weight in zip(models[1:], weights[1:]):
            merged.add_(model * weight)
        if params["normalize"]:
            merged.div_(math.fsum(weights))
        return merged

    base = base.to(compute_dtype)
    deltas = [model - base for model in models]
    if method == "task_arithmetic":
        merged = _weighted_sum(deltas, weights, params["normalize"])
    elif method == "ties" and params["scope"] == "model":
        trimmed = [_trim_at(delta, threshold) for delta, threshold in zip(deltas, statistics)]
        merged = _disjoint_merge(trimmed, weights, params["sign_election"], params["normalize"])
    elif method == "ties":
        trimmed = [_trim(delta, mp["density"]) for delta, mp in zip(deltas, model_params)]
        merged = _disjoint_merge(trimmed, weights, params["sign_election"], params["normalize"])
    elif method in ("dare_linear", "dare_ties"):
        dropped = [
            _drop(delta, mp["density"], seed, params["rescale"]) for delta, mp, seed in zip(deltas, model_params, seeds)
        ]
        if method == "dare_linear":
            merged = _weighted_sum(dropped, weights, params["normalize"])
        else:
            merged = _disjoint_merge(dropped, weights, params["sign_election"], params["normalize"])
    else:
        raise ValueError(f"no reference for method {method!r}")
    return merged.mul_(params["lambda"]).add_(base)
