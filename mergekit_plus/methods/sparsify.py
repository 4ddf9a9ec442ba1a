"""Sparsification and sign-consensus steps shared by the task-vector methods.

- `keep_count` and `magnitude_mask`: the exact top-k-by-magnitude mask that TIES uses to trim.
- `random_keep_mask` and `drop_and_rescale`: the seeded Bernoulli drop of DARE.
- `elect_signs` and `disjoint_merge`: the sign election and disjoint merge of TIES, also used by
  dare_ties.

The functions return new tensors and leave their arguments unchanged, except
`drop_and_rescale` and `disjoint_merge`, which overwrite the task vectors they are given.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

SIGN_ELECTIONS = ("trimmed", "weighted")
"""Choices of the `sign_election` parameter.

"trimmed" elects the sign of Σ τ̂ᵢ, as the TIES paper does; "weighted" elects the sign of
Σ wᵢ τ̂ᵢ, as mergekit does.
"""

_DIGIT_BITS = 16
_DIGIT_COUNT = 1 << _DIGIT_BITS

# Tensors are scanned for entries at the selection threshold in blocks of this many entries,
# so that the lists of positions stay small even when the whole tensor ties (an all-zero task
# vector does). A float32 bucket of up to this many entries is listed in one go.
_BLOCK = 1 << 22

# Uniform draws for the DARE mask are made in blocks of this many entries to bound the
# temporary memory. The block size is fixed, so the mask does not depend on the machine.
_RANDOM_BLOCK = 1 << 20


def keep_count(density: float, numel: int) -> int:
    """Return how many of `numel` entries a keep fraction of `density` keeps: floor(density·numel).

    A product within floating-point rounding of an integer counts as that integer, so that
    0.29 × 100 keeps 29 entries although the double product is 28.999999999999996.
    """
    if density <= 0 or numel == 0:
        return 0
    if density >= 1:
        return numel
    product = density * numel
    nearest = round(product)
    if abs(product - nearest) <= 1e-9 * max(1.0, product):
        return min(numel, nearest)
    return min(numel, math.floor(product))


def magnitude_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Return a boolean mask of the `k` entries of `values` with the largest absolute value.

    Exactly min(max(k, 0), numel) entries are kept. Among entries whose magnitude equals the
    threshold, the ones with the lowest flat (row-major) index are kept. NaN counts as larger
    than every number, because the selection orders the IEEE bit patterns of |x|.

    The threshold is found by a radix select instead of a sort. A non-negative float orders
    like its bit pattern read as an integer, so histograms of the 16-bit digits of that pattern
    (`torch.bincount`) locate the k-th largest magnitude in a few passes over the tensor.
    """
    numel = values.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= numel:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if not values.dtype.is_floating_point:
        raise TypeError(f"magnitude_mask needs a floating-point tensor, got {values.dtype}")

    # The bit-pattern views below need contiguous memory, which a strided 1-D view lacks.
    flat = values.contiguous().view(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        keep = _magnitude_mask_16(flat, k)
    else:
        keep = _magnitude_mask_wide(flat, k)
    return keep.view(values.shape)


def _magnitude_mask_16(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Select for float16 and bfloat16, whose whole magnitude is one 15-bit digit."""
    keys = flat.view(torch.int16) & 0x7FFF
    digit, tied_kept = _pick_digit(torch.bincount(keys, minlength=1 << 15), k)
    keep = keys > digit
    _keep_first_ties(keep, keys == digit, tied_kept)
    return keep


def _magnitude_mask_wide(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Select for float32 and float64: one pass over the high 16 bits, then one bucket's low bits.

    Reading the high 16 bits through a strided int16 view keeps the passes over the whole tensor
    cheap. Only the bucket that contains the threshold is read again, through its positions.
    """
    words = flat.element_size() // 2
    bits = flat.view(torch.int32 if words == 2 else torch.int64)
    high_word = words - 1 if sys.byteorder == "little" else 0
    high = bits.view(torch.int16)[high_word::words] & 0x7FFF
    high_digit, rank = _pick_digit(torch.bincount(high, minlength=1 << 15), k)
    keep = high > high_digit
    bucket = high == high_digit
    del high

    if int(torch.count_nonzero(bucket)) > _BLOCK:
        if words == 2:
            _keep_dense_bucket(keep, bucket, bits, rank)
            return keep
        return _magnitude_mask_64_full(bits, k)

    # Usually the bucket is a small fraction of the tensor, so a few operations on the list of
    # its positions finish the selection.
    low_bits = 16 * (words - 1)
    positions = bucket.nonzero().squeeze(1)
    low = bits[positions] & ((1 << low_bits) - 1)
    threshold, tied_kept = _select_threshold(low, rank, low_bits)
    keep[positions[low > threshold]] = True
    keep[positions[low == threshold][:tied_kept]] = True
    return keep


def _select_threshold(keys: torch.Tensor, rank: int, key_bits: int) -> tuple[int, int]:
    """Find the rank-th largest of non-negative `keys` (1-based), one 16-bit digit at a time.

    Returns that key t and how many keys equal to t are among the `rank` largest, so that
    rank = count(keys > t) + that number.
    """
    threshold = 0
    candidates = keys
    for shift in range(key_bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        digits = (candidates >> shift) & (_DIGIT_COUNT - 1)
        digit, rank = _pick_digit(torch.bincount(digits, minlength=_DIGIT_COUNT), rank)
        threshold |= digit << shift
        if shift > 0:
            candidates = candidates[digits == digit]
    return threshold, rank


def _magnitude_mask_64_full(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Select for float64 over the full 63-bit keys, for a bucket too large to list by position."""
    keys = bits & 0x7FFF_FFFF_FFFF_FFFF
    threshold, tied_kept = _select_threshold(keys, k, 64)
    keep = keys > threshold
    _keep_first_ties(keep, keys == threshold, tied_kept)
    return keep


def _keep_dense_bucket(keep: torch.Tensor, bucket: torch.Tensor, bits: torch.Tensor, rank: int) -> None:
    """Add to `keep` the `rank` largest entries of a bucket too large to list by position.

    Both passes go block by block with whole-block comparisons, so the temporary memory stays
    at a few blocks even when the bucket is the whole tensor (an all-zero task vector).
    """
    low_histogram = torch.zeros(_DIGIT_COUNT, dtype=torch.int64, device=bits.device)
    for start in range(0, bucket.numel(), _BLOCK):
        block = slice(start, start + _BLOCK)
        # Entries outside the bucket go to an extra bin that is dropped.
        low = torch.where(bucket[block], bits[block] & (_DIGIT_COUNT - 1), _DIGIT_COUNT)
        low_histogram += torch.bincount(low, minlength=_DIGIT_COUNT + 1)[:_DIGIT_COUNT]
    low_digit, tied_kept = _pick_digit(low_histogram, rank)

    for start in range(0, bucket.numel(), _BLOCK):
        block = slice(start, start + _BLOCK)
        low = bits[block] & (_DIGIT_COUNT - 1)
        keep[block] |= bucket[block] & (low > low_digit)
        tied = (bucket[block] & (low == low_digit)).nonzero().squeeze(1)
        keep[tied[:tied_kept] + start] = True
        tied_kept -= min(tied_kept, tied.numel())


def _pick_digit(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """Return the digit of the rank-th largest entry (1-based) and that entry's rank within the digit.

    `histogram[d]` counts the entries whose digit is d.
    """
    # at_or_above[j] counts the entries whose digit is at least (len - 1 - j).
    at_or_above = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(at_or_above, rank))
    digit = histogram.numel() - 1 - position
    above = int(at_or_above[position]) - int(histogram[digit])
    return digit, rank - above


def _keep_first_ties(keep: torch.Tensor, tied: torch.Tensor, count: int) -> None:
    """Set `keep` at the first `count` positions where `tied` is true, in flat index order."""
    for start in range(0, tied.numel(), _BLOCK):
        if count <= 0:
            return
        positions = tied[start : start + _BLOCK].nonzero().squeeze(1)
        keep[positions[:count] + start] = True
        count -= positions.numel()


def random_keep_mask(shape: torch.Size, density: float, seed: int, device: torch.device) -> torch.Tensor:
    """Return a boolean mask whose entries are true independently with probability `density`.

    The draws come from a CPU `torch.Generator` seeded with `seed`, so the mask depends only on
    (shape, density, seed): not on the device, the thread count or the order in which tensors
    are merged. The mask is then moved to `device`.
    """
    numel = math.prod(shape)
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if density <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)

    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    keep = torch.empty(numel, dtype=torch.bool)
    for start in range(0, numel, _RANDOM_BLOCK):
        stop = min(numel, start + _RANDOM_BLOCK)
        uniform = torch.rand(stop - start, generator=generator, dtype=torch.float32)
        torch.lt(uniform, density, out=keep[start:stop])
    return keep.view(shape).to(device)


def drop_and_rescale(delta: torch.Tensor, density: float, seed: int, *, rescale: bool) -> torch.Tensor:
    """Overwrite `delta` with DARE's m ⊙ δ / density, m ~ Bernoulli(density), and return it.

    Without `rescale` the kept entries are not divided. Density 1 leaves `delta` unchanged, and
    density 0 zeroes it rather than dividing 0 by 0.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    # Multiplying by the mask is faster on CPU than a masked fill.
    delta.mul_(random_keep_mask(delta.shape, density, seed, delta.device))
    if rescale:
        delta.div_(density)
    return delta


def elect_signs(deltas: Sequence[torch.Tensor], weights: Sequence[float], *, sign_election: str) -> torch.Tensor:
    """Return the elected sign γ (+1 or −1 at every coordinate) of a list of task vectors.

    γ = sign(Σ τᵢ) for "trimmed" and sign(Σ wᵢ τᵢ) for "weighted". Where the sum is exactly 0,
    γ takes the majority sign of the other coordinates of the tensor (the sign of Σ γ, as the
    TIES paper resolves it), and +1 when that is a tie too.
    """
    if sign_election not in SIGN_ELECTIONS:
        raise ValueError(f"sign_election must be one of {SIGN_ELECTIONS}, got {sign_election!r}")
    if not deltas:
        raise ValueError("the sign election needs at least one task vector, got none")
    weighted = sign_election == "weighted"

    total = deltas[0] * weights[0] if weighted else deltas[0].clone()
    for delta, weight in zip(deltas[1:], weights[1:]):
        total.add_(delta, alpha=weight if weighted else 1)

    # Counting in int64 keeps the majority exact on tensors past float32's 2**24 integer range.
    positive = int(torch.count_nonzero(total > 0))
    negative = int(torch.count_nonzero(total < 0))
    majority = 1 if positive >= negative else -1

    # Map sign(total) = −1, 0, +1 to −1, majority, +1: clamp(2·sign + majority, −1, 1).
    # Whole-tensor float arithmetic avoids a masked fill, which is several times slower on CPU.
    return total.sign_().mul_(2).add_(majority).clamp_(-1, 1)


def disjoint_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: str,
    normalize: bool,
) -> torch.Tensor:
    """Elect a sign per coordinate and merge only the task vectors that agree with it.

    A = {i : sign(τᵢ) == γ and τᵢ ≠ 0} at each coordinate. The result is Σ_{i∈A} wᵢ τᵢ, divided
    by Σ_{i∈A} wᵢ when `normalize` is true. Where that divisor is 0 (no model agrees, or the
    agreeing weights cancel) the result is 0, never NaN.

    The deltas are overwritten, so pass tensors you own.
    """
    signs = elect_signs(deltas, weights, sign_election=sign_election)

    # γ·τ is positive exactly where τ agrees with γ, so clamping it at 0 drops the other entries
    # and the zeros. Every step is exact: products with ±1 and a clamp. sign() of the clamped
    # value is the 0/1 indicator of agreement that the divisor counts.
    agreeing = deltas[0].mul_(signs).clamp_(min=0)
    denominator = agreeing.sign().mul_(weights[0]) if normalize else None
    # The first task vector's buffer becomes the numerator, which saves one tensor.
    numerator = agreeing.mul_(signs).mul_(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        agreeing = delta.mul_(signs).clamp_(min=0)
        numerator.addcmul_(agreeing, signs, value=weight)
        if denominator is not None:
            denominator.add_(agreeing.sign_(), alpha=weight)
    del signs

    if denominator is None:
        return numerator
    empty = denominator == 0
    denominator.masked_fill_(empty, 1)
    return numerator.div_(denominator).masked_fill_(empty, 0)
