"""Sparsification and sign-consensus steps shared by the task-vector methods.

- `keep_count`, `MagnitudeSelection` and `magnitude_mask`: the exact top-k-by-magnitude
  selection that TIES uses to trim, over a tensor that arrives chunk by chunk.
- `RandomKeepMasks`, `random_keep_mask` and `drop_and_rescale`: the seeded Bernoulli drop of DARE.
- `elect_signs`, `disjoint_merge` and `consensus_merge`: the sign election and disjoint merge of
  TIES, also used by dare_ties. `consensus_merge` runs them chunk by chunk over a whole tensor.

The functions return new tensors and leave their arguments unchanged, except
`drop_and_rescale`, `disjoint_merge` and `consensus_merge`, which overwrite the task vectors
they are given. Functions that take a `scratch` (`chunks.ChunkScratch`) return results that
live in its buffers, valid until the next call that uses the same scratch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from mergekit_plus.methods.chunks import Chunk, ChunkScratch, chunk_bounds

SIGN_ELECTIONS = ("trimmed", "weighted")
"""Choices of the `sign_election` parameter.

"trimmed" elects the sign of Σ τ̂ᵢ, as the TIES paper does; "weighted" elects the sign of
Σ wᵢ τ̂ᵢ, as mergekit does.
"""

_DIGIT_BITS = 16
_DIGIT_COUNT = 1 << _DIGIT_BITS
_KEY_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# The in-bucket histograms spread consecutive entries over this many interleaved copies of each
# bin. Most entries of such a pass fall into two or three bins (below the bucket, above it, one
# tied key), and `torch.bincount` runs about twice as slowly when consecutive increments hit a
# few bins in an unpredictable order.
_LANES = 4

# The chunk that holds a trim's last kept tie is searched in blocks of this many entries, so
# that only one block is listed position by position (`nonzero` is slow on a whole chunk).
_SEARCH_BLOCK = 1 << 12

# The maximum memory that the histograms of one selection use during a pass: the running
# histogram of an in-bucket pass and the chunk's histogram that is added to it, in int64.
SELECTION_HISTOGRAM_BYTES = 2 * _LANES * 2 * (_DIGIT_COUNT + 2) * 8

# Uniform draws for the DARE mask are made in blocks of this many entries to bound the
# temporary memory. The block size is fixed, so the mask does not depend on the machine.
_RANDOM_BLOCK = 1 << 20

# A float32 sum of −1, 0 and +1 values is exact up to this many values.
_EXACT_SIGN_SUM = 1 << 24


def _buffer(scratch: ChunkScratch | None, name: str, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """Return a 1-D buffer with as many entries as `like`: from `scratch` when given, else new."""
    if scratch is None:
        return torch.empty(like.numel(), dtype=dtype, device=like.device)
    return scratch.get(name, dtype, like.numel())


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Return the IEEE bit patterns of `values` as signed integers of the same width."""
    return values.view(_KEY_DTYPES[values.element_size()])


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


def magnitude_keys(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return integers that order like |values|: the IEEE bit patterns without the sign bit.

    A non-negative float orders like its bit pattern read as an integer, with NaN above
    infinity. `values` must be contiguous.
    """
    largest = (1 << (8 * values.element_size() - 1)) - 1
    return torch.bitwise_and(_bits(values), largest, out=out)


class MagnitudeSelection:
    """The exact k-th largest magnitude of a tensor that is fed chunk by chunk, by radix select.

    Each pass over the chunks histograms one 16-bit digit of the keys (`magnitude_keys`) that
    share the digits chosen so far. The first digit has 15 bits because the sign bit is dropped,
    so a 16-bit float needs one pass, a float32 at most two and a float64 at most four. A histogram
    also counts apart the keys whose bits below the digit are all 0, so a pass can stop the
    search early. Task vectors of bfloat16 weights computed in float32 mostly have 16 zero
    low bits, so one pass is usually enough for them.

    Use it as:

        while not selection.done:
            for chunk in chunks: selection.count(chunk)
            selection.next_digit()
        masks = selection.masks()
        for chunk in chunks: keep = masks.next(chunk, out=...)

    The chunks must be contiguous and come in flat order, the same ones in every pass. The
    threshold itself does not depend on that order, so the chunks of many tensors (a whole
    model, say) may be fed to one selection, in any order that stays the same in every pass.
    Only `masks` needs the flat order.
    """

    def __init__(self, k: int, numel: int, dtype: torch.dtype):
        if not dtype.is_floating_point:
            raise TypeError(f"the magnitude selection needs a floating-point dtype, got {dtype}")
        if not 0 < k < numel:
            raise ValueError(f"the magnitude selection needs 0 < k < numel, got k={k} for {numel} entries")
        bits = 8 * dtype.itemsize
        self.k = k
        self._shifts = tuple(range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS))
        self._level = 0
        self._prefix = 0
        self._rank = k
        self._histogram: torch.Tensor | None = None
        self._lane_offsets: torch.Tensor | None = None
        self.threshold: int | None = None
        """The key at which the selection cuts, once `done`."""
        self.tied_kept = 0
        """How many keys equal to `threshold` are kept, lowest flat index first."""
        self.tied_total = 0
        """How many keys equal `threshold`. When it equals `tied_kept`, every key at or above the
        threshold is kept, and the threshold need not be a key of the tensor."""

    @property
    def done(self) -> bool:
        return self.threshold is not None

    @property
    def max_passes(self) -> int:
        """The maximum number of passes over the chunks that the selection takes: one per digit."""
        return len(self._shifts)

    def cut_with_ties(self) -> tuple[int, int]:
        """Return the smallest kept key and the kept count when every tie of the k-th largest key is kept.

        Keeping the keys at or above the returned key keeps the k largest entries plus every entry
        tied with the k-th largest, as the TIES reference code's rule |τ| ≥ q does.
        """
        if self.threshold is None:
            raise RuntimeError("the magnitude selection is not done yet")
        if self.tied_kept == 0:
            # The k kept keys are all above `threshold`, so the cut lies just above it.
            return self.threshold + 1, self.k
        return self.threshold, self.k - self.tied_kept + self.tied_total

    def count(self, values: torch.Tensor, scratch: ChunkScratch | None = None) -> None:
        """Add one chunk of the tensor to the histogram of the current pass."""
        if self.done:
            raise RuntimeError("the magnitude selection is already done")
        shift = self._shifts[self._level]
        bits = _bits(values)
        codes = _buffer(scratch, "codes", bits.dtype, bits)
        if self._level == 0:
            # Code 2·digit + (lower bits nonzero), or the digit alone for a 16-bit float.
            top_digit = ((1 << (8 * values.element_size() - 1)) - 1) & ~((1 << shift) - 1)
            torch.bitwise_and(bits, top_digit, out=codes)
            if shift:
                codes.bitwise_right_shift_(shift - 1).bitwise_or_(_lower_bits_nonzero(bits, shift, scratch))
            bins = (1 << (_DIGIT_BITS - 1)) * (2 if shift else 1)
        else:
            self._bucket_codes(bits, codes, shift, scratch)
            bins = _LANES * (2 if shift else 1) * (_DIGIT_COUNT + 2)
        histogram = torch.bincount(codes, minlength=bins)
        if self._histogram is None:
            self._histogram = histogram
        else:
            self._histogram.add_(histogram)

    def _bucket_codes(self, bits: torch.Tensor, codes: torch.Tensor, shift: int, scratch: ChunkScratch | None) -> None:
        """Write into `codes` 1 + digit for keys in the current bucket, 0 below it and 2¹⁶ + 1 above it.

        With bits below this digit, the code becomes 2·code + (lower bits nonzero). Then each code
        is spread over `_LANES` bins by the entry's position.
        """
        largest = (1 << (8 * bits.element_size() - 1)) - 1
        torch.bitwise_and(bits, largest, out=codes)
        if shift:
            codes.bitwise_right_shift_(shift)
        codes.sub_(self._prefix << _DIGIT_BITS).clamp_(-1, _DIGIT_COUNT).add_(1)
        if shift:
            codes.mul_(2).add_(_lower_bits_nonzero(bits, shift, scratch))
        codes.mul_(_LANES)
        whole = codes.numel() - codes.numel() % _LANES
        if self._lane_offsets is None:
            self._lane_offsets = torch.arange(_LANES, dtype=codes.dtype, device=codes.device)
        codes[:whole].view(-1, _LANES).add_(self._lane_offsets)

    def next_digit(self) -> None:
        """Choose the digit of the k-th largest key from the pass just finished.

        Sets `threshold`, `tied_kept` and `tied_total` when the key is known, or else starts the
        next digit's pass.
        """
        if self._histogram is None:
            raise RuntimeError("next_digit needs a pass of count() calls first")
        histogram, self._histogram = self._histogram, None
        shift = self._shifts[self._level]
        flagged = shift > 0
        if self._level > 0:
            # Fold the lanes, then drop the bins below and above the bucket.
            histogram = histogram.view(-1, _LANES).sum(1)
            width = 2 if flagged else 1
            histogram = histogram[width : width * (_DIGIT_COUNT + 1)]
        pairs = histogram.view(-1, 2) if flagged else histogram.view(-1, 1)
        digit, rank = _pick_digit(pairs.sum(1), self._rank)
        in_bucket = int(pairs[digit].sum())
        # Keys of this bucket whose lower bits are not all 0, so above the bucket's smallest key.
        above_smallest = int(pairs[digit, 1]) if flagged else 0

        prefix = (self._prefix << _DIGIT_BITS) | digit
        smallest = prefix << shift
        if rank == in_bucket:
            self._finish(smallest, in_bucket, in_bucket)
        elif not flagged:
            self._finish(prefix, rank, in_bucket)
        elif rank >= above_smallest:
            # The entries whose lower bits are all 0 hold the bucket's smallest key, and every
            # larger key is kept. The cut falls among those entries, or just above them.
            self._finish(smallest, rank - above_smallest, in_bucket - above_smallest)
        else:
            self._level += 1
            self._prefix = prefix
            self._rank = rank

    def _finish(self, threshold: int, tied_kept: int, tied_total: int) -> None:
        self.threshold = threshold
        self.tied_kept = tied_kept
        self.tied_total = tied_total

    def masks(self) -> MagnitudeMasks:
        """Return a fresh mask maker for one pass over the chunks."""
        if self.threshold is None:
            raise RuntimeError("the magnitude selection is not done yet")
        return MagnitudeMasks(self.threshold, self.tied_kept, self.tied_total)


class MagnitudeMasks:
    """Makes the keep mask of each chunk, in flat order, from a finished `MagnitudeSelection`.

    Keys above the threshold are kept. Keys equal to it are kept until `tied_kept` of them have
    been, so the lowest flat indices win. A running count carries that rule across chunks.
    """

    def __init__(self, threshold: int, tied_kept: int, tied_total: int):
        self._threshold = threshold
        self._ties_to_keep = tied_kept
        self._ties_left = tied_total

    def next(self, values: torch.Tensor, out: torch.Tensor, scratch: ChunkScratch | None = None) -> torch.Tensor:
        """Write the next chunk's keep mask into `out` (bool, or 1 and 0 in a number dtype) and return it."""
        keys = magnitude_keys(values, out=_buffer(scratch, "keys", _bits(values).dtype, values))
        threshold = self._threshold
        if self._ties_to_keep == self._ties_left:
            return torch.ge(keys, threshold, out=out)
        if self._ties_to_keep == 0:
            return torch.gt(keys, threshold, out=out)

        tied = torch.eq(keys, threshold, out=_buffer(scratch, "tied", torch.int32, keys))
        count = int(tied.sum(dtype=torch.int32))
        self._ties_left -= count
        if count <= self._ties_to_keep:
            self._ties_to_keep -= count
            return torch.ge(keys, threshold, out=out)
        # This chunk contains the last kept tie: keep the ties up to it, and after it larger keys only.
        cut = _end_of_first(tied, self._ties_to_keep)
        torch.gt(keys, threshold, out=out)
        torch.ge(keys[:cut], threshold, out=out[:cut])
        self._ties_to_keep = 0
        return out


def _end_of_first(flags: torch.Tensor, count: int) -> int:
    """Return the index just past the count-th 1 (count ≥ 1) in the 1-D 0/1 int32 tensor `flags`."""
    whole = flags.numel() - flags.numel() % _SEARCH_BLOCK
    # Summing int32 as int32 is several times faster than count_nonzero, and a chunk's counts fit.
    block_counts = flags[:whole].view(-1, _SEARCH_BLOCK).sum(1, dtype=torch.int32)
    if whole < flags.numel():
        block_counts = torch.cat([block_counts, flags[whole:].sum(dtype=torch.int32).view(1)])
    at_or_before = block_counts.cumsum(0)
    block = int(torch.searchsorted(at_or_before, count))
    before = int(at_or_before[block - 1]) if block > 0 else 0
    start = block * _SEARCH_BLOCK
    positions = flags[start : start + _SEARCH_BLOCK].nonzero().squeeze(1)
    return start + int(positions[count - before - 1]) + 1


def _lower_bits_nonzero(bits: torch.Tensor, count: int, scratch: ChunkScratch | None) -> torch.Tensor:
    """Return 1 where the low `count` bits of a bit pattern are not all 0, else 0."""
    flags = torch.bitwise_and(bits, (1 << count) - 1, out=_buffer(scratch, "flags", bits.dtype, bits))
    return flags.clamp_(max=1)


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


def magnitude_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Return a boolean mask of the `k` entries of `values` with the largest absolute value.

    Exactly min(max(k, 0), numel) entries are kept. Among entries whose magnitude equals the
    threshold, the ones with the lowest flat (row-major) index are kept. NaN counts as larger
    than every number, because the selection orders the IEEE bit patterns of |x|.

    The threshold is found chunk by chunk by a radix select (`MagnitudeSelection`) instead of
    a sort.
    """
    numel = values.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= numel:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if not values.dtype.is_floating_point:
        raise TypeError(f"magnitude_mask needs a floating-point tensor, got {values.dtype}")

    flat = values.contiguous().view(-1)
    scratch = ChunkScratch(numel, values.device)
    selection = MagnitudeSelection(k, numel, values.dtype)
    while not selection.done:
        for start, stop in chunk_bounds(numel):
            selection.count(flat[start:stop], scratch)
        selection.next_digit()

    keep = torch.empty(numel, dtype=torch.bool, device=values.device)
    masks = selection.masks()
    for start, stop in chunk_bounds(numel):
        masks.next(flat[start:stop], out=keep[start:stop], scratch=scratch)
    return keep.view(values.shape)


class RandomKeepMasks:
    """DARE's keep mask for one tensor, with entries true independently with probability `density`.

    The draws come from a CPU `torch.Generator` seeded with `seed`, in blocks of a fixed size.
    So the mask depends only on (numel, density, seed), and not on the device, the thread
    count, the sizes requested from `next` or the order in which tensors are merged. `next`
    hands the mask out in flat order, so a whole mask never has to exist.
    """

    def __init__(self, numel: int, density: float, seed: int):
        self._numel = numel
        self._density = density
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._drawn = 0
        self._uniform = torch.empty(0)
        self._used = 0
        self._keep: dict[torch.dtype, torch.Tensor] = {}

    def next(self, count: int, *, dtype: torch.dtype = torch.bool, device: torch.device | None = None) -> torch.Tensor:
        """Return the mask's next `count` entries as `dtype` (bool, or 1 and 0 in a number dtype).

        On the CPU the result is a buffer that the next call overwrites.
        """
        keep = self._keep.get(dtype)
        if keep is None or keep.numel() < count:
            keep = self._keep[dtype] = torch.empty(count, dtype=dtype)
        keep = keep[:count]
        filled = 0
        while filled < count:
            if self._used == self._uniform.numel():
                self._draw_block()
            take = min(count - filled, self._uniform.numel() - self._used)
            torch.lt(self._uniform[self._used : self._used + take], self._density, out=keep[filled : filled + take])
            self._used += take
            filled += take
        return keep if device is None else keep.to(device)

    def _draw_block(self) -> None:
        size = min(_RANDOM_BLOCK, self._numel - self._drawn)
        if size <= 0:
            raise ValueError(f"the mask has only {self._numel} entries, and all of them were handed out")
        self._uniform = torch.rand(size, generator=self._generator, dtype=torch.float32)
        self._drawn += size
        self._used = 0


def random_keep_mask(shape: torch.Size, density: float, seed: int, device: torch.device) -> torch.Tensor:
    """Return a boolean mask whose entries are true independently with probability `density`.

    This is the whole of the mask that `RandomKeepMasks` hands out chunk by chunk.
    """
    numel = math.prod(shape)
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if density <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return RandomKeepMasks(numel, density, seed).next(numel, device=device).view(shape)


def drop_and_rescale(delta: torch.Tensor, density: float, keep: torch.Tensor | None, *, rescale: bool) -> torch.Tensor:
    """Overwrite `delta` with DARE's m ⊙ δ / density, m the 0/1 mask `keep`, and return it.

    Without `rescale` the kept entries are not divided. Density 1 leaves `delta` unchanged, and
    density 0 zeroes it rather than dividing 0 by 0. `keep` is only read for densities in between.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if keep is None:
        raise ValueError(f"density {density} drops entries at random, so it needs a keep mask, got None")
    # Multiplying by the mask is faster on CPU than a masked fill.
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


def check_sign_election(sign_election: str) -> None:
    """Raise ValueError unless `sign_election` is one of `SIGN_ELECTIONS`."""
    if sign_election not in SIGN_ELECTIONS:
        raise ValueError(f"sign_election must be one of {SIGN_ELECTIONS}, got {sign_election!r}")


def elected_sum(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the sum whose sign is elected: Σ τᵢ for "trimmed", Σ wᵢ τᵢ for "weighted".

    The sum is written into `out` when it is given.
    """
    check_sign_election(sign_election)
    if not deltas:
        raise ValueError("the sign election needs at least one task vector, got none")
    weighted = sign_election == "weighted"
    if weighted:
        total = torch.mul(deltas[0], weights[0], out=out)
    else:
        total = deltas[0].clone() if out is None else out.copy_(deltas[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        total.add_(delta, alpha=weight if weighted else 1)
    return total


def sign_balance(total: torch.Tensor) -> int:
    """Return how many entries of `total` are positive minus how many are negative."""
    # Counting in int64 keeps the balance exact on tensors past float32's 2**24 integer range.
    return int(torch.count_nonzero(total > 0)) - int(torch.count_nonzero(total < 0))


def _sum_of_signs(signs: torch.Tensor) -> int:
    """Return the exact sum of a chunk of −1, 0 and +1 values: a faster `sign_balance` for chunks."""
    if signs.numel() > _EXACT_SIGN_SUM:
        return sign_balance(signs)
    # Every partial sum is an integer no larger than the count, so float32 represents it exactly.
    return int(signs.sum(dtype=torch.float64 if signs.element_size() > 4 else torch.float32))


def majority_sign(balance: int) -> int:
    """Return the majority sign for a `sign_balance`: +1, or −1 when negative entries outnumber positive ones."""
    return 1 if balance >= 0 else -1


def elect_signs(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: str,
    majority: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the elected sign γ (+1 or −1 at every coordinate) of a list of task vectors.

    γ = sign(Σ τᵢ) for "trimmed" and sign(Σ wᵢ τᵢ) for "weighted". Where the sum is exactly 0,
    γ is `majority`. By default that is the majority sign of the other coordinates (the sign
    of Σ γ, as the TIES paper resolves it), and +1 when that is a tie too. A caller that
    elects a tensor in chunks passes the majority of the whole tensor. The signs are written
    into `out` when it is given.
    """
    total = elected_sum(deltas, weights, sign_election=sign_election, out=out)
    if majority is None:
        majority = majority_sign(sign_balance(total))

    # Map sign(total) = −1, 0, +1 to −1, majority, +1: clamp(2·sign + majority, −1, 1).
    # Whole-tensor float arithmetic avoids a masked fill, which is several times slower on CPU.
    return total.sign_().mul_(2).add_(majority).clamp_(-1, 1)


def disjoint_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_election: str,
    normalize: bool,
    majority: int | None = None,
    scratch: ChunkScratch | None = None,
) -> torch.Tensor:
    """Elect a sign per coordinate and merge only the task vectors that agree with it.

    A = {i : sign(τᵢ) == γ and τᵢ ≠ 0} at each coordinate. The result is Σ_{i∈A} wᵢ τᵢ, divided
    by Σ_{i∈A} wᵢ when `normalize` is true. Where that divisor is 0 (no model agrees, or the
    agreeing weights cancel) the result is +0, never NaN. `majority` is passed to `elect_signs`.

    The deltas are overwritten, and the result is the first delta's buffer, so pass tensors
    you own.
    """
    first = deltas[0]
    signs = elect_signs(
        deltas,
        weights,
        sign_election=sign_election,
        majority=majority,
        out=None if scratch is None else _buffer(scratch, "signs", first.dtype, first),
    )

    # γ·τ is positive exactly where τ agrees with γ, so clamping it at 0 drops the other entries
    # and the zeros. Every step is exact: products with ±1 and a clamp. sign() of the clamped
    # value is the 0/1 indicator of agreement that the divisor counts.
    agreeing = first.mul_(signs).clamp_(min=0)
    denominator = None
    if normalize:
        denominator = torch.sign(agreeing, out=_buffer(scratch, "denominator", first.dtype, first)).mul_(weights[0])
    # The first task vector's buffer becomes the numerator, which saves one tensor.
    numerator = agreeing.mul_(signs).mul_(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        agreeing = delta.mul_(signs).clamp_(min=0)
        numerator.addcmul_(agreeing, signs, value=weight)
        if denominator is not None:
            denominator.add_(agreeing.sign_(), alpha=weight)

    if denominator is None:
        return numerator
    # Divide by 1 where the divisor is 0, then clear those quotients' bits to +0. Integer masks
    # give the same values as two masked fills at a fraction of their cost on CPU.
    empty = torch.eq(denominator, 0, out=_buffer(scratch, "empty", _bits(first).dtype, first))
    denominator.add_(empty)
    numerator.div_(denominator)
    _bits(numerator).bitwise_and_(empty.sub_(1))
    return numerator


def elected_sign_balance(
    chunks: Iterable[Chunk],
    weights: Sequence[float],
    *,
    sign_election: str,
    scratch: ChunkScratch | None = None,
) -> int:
    """Return Σ sign(elected sum) over every coordinate of the chunks: the input of `majority_sign`."""
    balance = 0
    for chunk in chunks:
        first = chunk.deltas[0]
        total = elected_sum(
            chunk.deltas,
            weights,
            sign_election=sign_election,
            out=None if scratch is None else _buffer(scratch, "signs", first.dtype, first),
        )
        balance += _sum_of_signs(total.sign_())
    return balance


def consensus_merge(
    chunks: Callable[[], Iterable[Chunk]],
    output: torch.Tensor,
    weights: Sequence[float],
    *,
    sign_election: str,
    normalize: bool,
    scale: float,
    scratch: ChunkScratch | None = None,
    majority: int | None = None,
) -> torch.Tensor:
    """Write θ₀ + scale · (disjoint merge of the task vectors) into the flat `output`, chunk by chunk.

    `chunks()` is called once per pass and must yield the same sparsified task vectors every
    time, in flat order. Without `majority` the merge needs two passes, because a coordinate
    whose elected sum is 0 takes the majority sign of the whole tensor:

    1. Sum the signs of the elected sums over the whole tensor (`elected_sign_balance`).
    2. Merge each chunk with that majority and add it to the base.

    So each chunk equals the whole-tensor `disjoint_merge` at its coordinates, bit for bit. A
    caller that found the majority over a wider scope (the whole model) passes it as `majority`,
    and the first pass is skipped.
    """
    check_sign_election(sign_election)
    if majority is None:
        majority = majority_sign(elected_sign_balance(chunks(), weights, sign_election=sign_election, scratch=scratch))

    for chunk in chunks():
        merged = disjoint_merge(
            chunk.deltas,
            weights,
            sign_election=sign_election,
            normalize=normalize,
            majority=majority,
            scratch=scratch,
        )
        torch.add(merged.mul_(scale), chunk.base, out=output[chunk.start : chunk.stop])
    return output
