"""Tests of the shared sparsification steps: top-k mask, DARE drop, sign election, disjoint merge."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods import chunks, sparsify
from mergekit_plus.methods.chunks import Chunk, chunk_bounds
from mergekit_plus.methods.sparsify import (
    MagnitudeSelection,
    RandomKeepMasks,
    consensus_merge,
    disjoint_merge,
    drop_and_rescale,
    elect_signs,
    keep_count,
    magnitude_mask,
    random_keep_mask,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sorted_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference mask: stable descending sort of |x|, so ties keep the lowest flat index."""
    magnitudes = values.reshape(-1).abs()
    order = torch.sort(magnitudes, descending=True, stable=True).indices[: max(k, 0)]
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(values.shape)


def sample_tensors(dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    """Continuous values, many ties (small integers, ±0), an all-zero tensor, tiny and huge values."""
    tiny = torch.randn(97, generator=generator, dtype=torch.float64) * 1e-4
    return [
        torch.randn(131, generator=generator, dtype=torch.float64).to(dtype),
        torch.randint(-3, 4, (11, 13), generator=generator).to(dtype),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0, 1.0, -0.0, -1.0], dtype=dtype),
        torch.zeros(64, dtype=dtype),
        tiny.to(dtype),
        torch.tensor([65000.0, -65000.0, 1e-3, -1e-3, 2.0, float("inf"), -float("inf")], dtype=dtype),
    ]


# keep_count


@pytest.mark.parametrize(
    ("density", "numel", "expected"),
    [
        (0.2, 10, 2),
        (0.5, 5, 2),  # floor(2.5)
        (0.29, 100, 29),  # 0.29 * 100 is 28.999999999999996 in doubles
        (4 / 6, 6, 4),
        (0.05, 16, 0),  # 0.8 rounds down to nothing
        (0.0, 16, 0),
        (1.0, 7, 7),
        (0.999, 10, 9),
        (0.5, 0, 0),
    ],
)
def test_keep_count_floors_product(density, numel, expected):
    assert keep_count(density, numel) == expected


# magnitude_mask


def test_magnitude_mask_hand_case():
    values = torch.tensor([0.1, -3.0, 2.0, -2.0, 0.5])
    # |x| = 0.1, 3, 2, 2, 0.5: the two largest are 3 and the first 2 (index 2 beats index 3).
    assert magnitude_mask(values, 2).tolist() == [False, True, True, False, False]
    assert magnitude_mask(values, 3).tolist() == [False, True, True, True, False]
    assert magnitude_mask(values, 4).tolist() == [False, True, True, True, True]


def test_magnitude_mask_keeps_shape():
    values = torch.tensor([[1.0, -4.0], [3.0, 2.0]])
    assert magnitude_mask(values, 2).tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magnitude_mask_matches_sort(dtype):
    generator = torch.Generator().manual_seed(0)
    for values in sample_tensors(dtype, generator):
        numel = values.numel()
        for k in sorted({0, 1, 2, numel // 3, numel // 2, numel - 1, numel, numel + 3}):
            mask = magnitude_mask(values, k)
            assert mask.dtype == torch.bool
            assert int(mask.sum()) == min(max(k, 0), numel), (values.dtype, numel, k)
            assert torch.equal(mask, sorted_top_k(values, k)), (values.dtype, numel, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magnitude_mask_small_chunks(monkeypatch, dtype):
    # Chunks of 16 entries spread each histogram pass and the tie count over many chunks.
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 16)
    generator = torch.Generator().manual_seed(1)
    for values in sample_tensors(dtype, generator):
        for k in (1, values.numel() // 4, values.numel() // 2, values.numel() - 1):
            assert torch.equal(magnitude_mask(values, k), sorted_top_k(values, k)), (dtype, values.numel(), k)


def test_magnitude_mask_shared_high_bits():
    # All values share the high 16 bits of float32, so only the low 16 bits order them.
    base = torch.tensor(1.0).view(torch.int32)
    values = (base + torch.tensor([5, 3, 9, 3, 0, 9, 7], dtype=torch.int32)).view(torch.float32)
    expected = [False, False, True, False, False, True, True]  # 9, 9, then 7
    assert magnitude_mask(values, 3).tolist() == expected
    assert torch.equal(magnitude_mask(values, 4), sorted_top_k(values, 4))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magnitude_mask_non_contiguous(dtype):
    generator = torch.Generator().manual_seed(2)
    transposed = torch.randn(6, 5, generator=generator).to(dtype).t()
    assert torch.equal(magnitude_mask(transposed, 7), sorted_top_k(transposed.contiguous(), 7))
    strided = torch.randn(40, generator=generator).to(dtype)[::3]
    assert torch.equal(magnitude_mask(strided, 5), sorted_top_k(strided.contiguous(), 5))


def test_magnitude_mask_leaves_input():
    values = torch.tensor([-1.0, 2.0, -3.0])
    before = values.clone()
    magnitude_mask(values, 1)
    assert torch.equal(values, before)


def test_magnitude_mask_rejects_integers():
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        magnitude_mask(torch.tensor([1, 2, 3]), 1)


def select(values: torch.Tensor, k: int) -> tuple[MagnitudeSelection, int]:
    """Run a selection over the chunks of `values`, and return it with the number of passes it took."""
    flat = values.reshape(-1)
    selection = MagnitudeSelection(k, flat.numel(), values.dtype)
    passes = 0
    while not selection.done:
        for start, stop in chunk_bounds(flat.numel()):
            selection.count(flat[start:stop])
        selection.next_digit()
        passes += 1
    return selection, passes


def test_selection_one_pass_for_bfloat16_task_vectors():
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(500, generator=generator).bfloat16()
    model = (base.float() + torch.randn(500, generator=generator) * 0.01).bfloat16()
    # Differences of nearby bfloat16 values need few significant bits, so their low 16 float32
    # bits are 0 and the first digit's zero-low-bits count settles the threshold.
    task_vector = model.float() - base.float()
    selection, passes = select(task_vector, 100)
    assert passes == 1
    assert selection.tied_kept >= 1


@pytest.mark.parametrize(
    ("dtype", "expected_passes"),
    [(torch.float16, 1), (torch.bfloat16, 1), (torch.float32, 2), (torch.float64, 4)],
)
def test_selection_passes_per_dtype(dtype, expected_passes):
    # Keys that agree in every digit but the last one need a pass per digit.
    one = torch.tensor(1.0, dtype=dtype)
    offsets = torch.tensor([5, 3, 9, 3, 0, 9, 7], dtype=_int_dtype(dtype))
    values = (one.view(_int_dtype(dtype)) + offsets).view(dtype)
    selection, passes = select(values, 3)
    assert passes == expected_passes
    assert selection.tied_kept == selection.tied_total


def test_selection_stops_above_bucket_minimum():
    # Two keys above 1.0 share 1.0's top 16 bits, and k = 2 keeps exactly those two.
    one = torch.tensor(1.0).view(torch.int32)
    values = (one + torch.tensor([0, 7, 0, 5, 0], dtype=torch.int32)).view(torch.float32)
    selection, passes = select(values, 2)
    assert passes == 1
    assert selection.tied_kept == 0
    assert magnitude_mask(values, 2).tolist() == [False, True, False, True, False]


def test_selection_rejects_trivial_k():
    with pytest.raises(ValueError, match="needs 0 < k < numel, got k=4 for 4 entries"):
        MagnitudeSelection(4, 4, torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magnitude_mask_ties_straddle_chunks(monkeypatch, dtype):
    # Chunks of 16 and tie searches in blocks of 4: the tied entries run over many chunks, so
    # the count of kept ties carries across chunk and block boundaries.
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 16)
    monkeypatch.setattr(sparsify, "_SEARCH_BLOCK", 4)
    generator = torch.Generator().manual_seed(5)
    values = torch.randint(-2, 3, (203,), generator=generator).to(dtype) * 0.5
    for k in range(1, values.numel(), 7):
        mask = magnitude_mask(values, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, sorted_top_k(values, k)), (dtype, k)


def test_magnitude_mask_float64_low_digit(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 16)
    generator = torch.Generator().manual_seed(6)
    one = torch.tensor(1.0, dtype=torch.float64).view(torch.int64)
    values = (one + torch.randint(0, 40, (100,), generator=generator)).view(torch.float64)
    for k in (1, 13, 50, 99):
        assert torch.equal(magnitude_mask(values, k), sorted_top_k(values, k)), k


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


# random_keep_mask and drop_and_rescale


def test_random_mask_same_seed_same_bytes():
    first = random_keep_mask(torch.Size([50, 40]), 0.3, 1234, torch.device("cpu"))
    second = random_keep_mask(torch.Size([50, 40]), 0.3, 1234, torch.device("cpu"))
    assert torch.equal(first, second)


def test_random_mask_other_seed_differs():
    first = random_keep_mask(torch.Size([2000]), 0.5, 1, torch.device("cpu"))
    second = random_keep_mask(torch.Size([2000]), 0.5, 2, torch.device("cpu"))
    assert not torch.equal(first, second)


def test_random_mask_ignores_thread_count():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = random_keep_mask(torch.Size([300_000]), 0.4, 7, torch.device("cpu"))
        torch.set_num_threads(max(2, previous))
        many_threads = random_keep_mask(torch.Size([300_000]), 0.4, 7, torch.device("cpu"))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one_thread, many_threads)


def test_random_mask_spans_blocks(monkeypatch):
    # The mask must not depend on the block size used to draw it.
    whole = random_keep_mask(torch.Size([1000]), 0.5, 3, torch.device("cpu"))
    monkeypatch.setattr(sparsify, "_RANDOM_BLOCK", 64)
    blocked = random_keep_mask(torch.Size([1000]), 0.5, 3, torch.device("cpu"))
    assert torch.equal(whole, blocked)


def test_random_masks_in_pieces_match_whole():
    whole = random_keep_mask(torch.Size([5000]), 0.3, 21, torch.device("cpu"))
    masks = RandomKeepMasks(5000, 0.3, 21)
    pieces = [masks.next(size).clone() for size in (1, 999, 2048, 1952)]
    assert torch.equal(torch.cat(pieces), whole)


def test_random_masks_across_blocks(monkeypatch):
    monkeypatch.setattr(sparsify, "_RANDOM_BLOCK", 64)
    whole = random_keep_mask(torch.Size([1000]), 0.6, 8, torch.device("cpu"))
    masks = RandomKeepMasks(1000, 0.6, 8)
    pieces = [masks.next(size).clone() for size in (100, 28, 500, 372)]
    assert torch.equal(torch.cat(pieces), whole)


def test_random_masks_float_dtype_matches_bool():
    as_bool = RandomKeepMasks(300, 0.4, 9).next(300)
    as_float = RandomKeepMasks(300, 0.4, 9).next(300, dtype=torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float, as_bool.float())


def test_random_masks_reject_overdraw():
    masks = RandomKeepMasks(10, 0.5, 1)
    masks.next(10)
    with pytest.raises(ValueError, match="the mask has only 10 entries, and all of them were handed out"):
        masks.next(1)


def test_random_mask_keep_fraction():
    mask = random_keep_mask(torch.Size([200_000]), 0.3, 11, torch.device("cpu"))
    # The standard deviation of the fraction is sqrt(0.3 * 0.7 / 200000), about 0.001.
    assert abs(mask.float().mean().item() - 0.3) < 0.01


def test_random_mask_density_edges():
    assert bool(random_keep_mask(torch.Size([64]), 1.0, 0, torch.device("cpu")).all())
    assert not bool(random_keep_mask(torch.Size([64]), 0.0, 0, torch.device("cpu")).any())


def test_drop_and_rescale_values():
    delta = torch.arange(1.0, 1001.0)
    keep = random_keep_mask(delta.shape, 0.25, 5, delta.device)
    dropped = drop_and_rescale(delta.clone(), 0.25, keep, rescale=True)
    kept = dropped != 0
    assert torch.equal(kept, keep)
    assert torch.equal(dropped[kept], delta[kept] / 0.25)
    unscaled = drop_and_rescale(delta.clone(), 0.25, keep, rescale=False)
    assert torch.equal(unscaled != 0, kept)
    assert torch.equal(unscaled[kept], delta[kept])


def test_drop_and_rescale_density_edges():
    delta = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(drop_and_rescale(delta.clone(), 0.0, None, rescale=True), torch.zeros(3))
    assert torch.equal(drop_and_rescale(delta.clone(), 1.0, None, rescale=True), delta)


def test_drop_and_rescale_rejects_missing_mask():
    with pytest.raises(ValueError, match="density 0.5 drops entries at random, so it needs a keep mask"):
        drop_and_rescale(torch.ones(3), 0.5, None, rescale=True)


def test_drop_and_rescale_unbiased():
    delta = torch.tensor([1.0, -2.0, 0.5, 4.0])
    total = torch.zeros(4)
    draws = 4000
    for seed in range(draws):
        keep = random_keep_mask(delta.shape, 0.5, seed, delta.device)
        total += drop_and_rescale(delta.clone(), 0.5, keep, rescale=True)
    # Each draw has standard deviation |δ| at density 0.5, so the mean's is |δ| / 63.
    torch.testing.assert_close(total / draws, delta, rtol=0.06, atol=0.0)


# elect_signs and disjoint_merge


def test_elect_signs_trimmed_vs_weighted():
    deltas = [torch.tensor([1.0, 1.0]), torch.tensor([-0.5, -0.5])]
    weights = [0.2, 1.0]
    # Σ τ = +0.5 elects +; Σ w τ = 0.2 − 0.5 = −0.3 elects −.
    assert elect_signs(deltas, weights, sign_election="trimmed").tolist() == [1.0, 1.0]
    assert elect_signs(deltas, weights, sign_election="weighted").tolist() == [-1.0, -1.0]


def test_elect_signs_zero_sum_takes_majority():
    deltas = [torch.tensor([0.5, -0.3, -0.2]), torch.tensor([-0.5, -0.1, -0.4])]
    # Sums are [0, −0.4, −0.6]: two negative coordinates, so the tie at 0 goes negative.
    assert elect_signs(deltas, [1.0, 1.0], sign_election="trimmed").tolist() == [-1.0, -1.0, -1.0]


def test_elect_signs_full_tie_is_positive():
    deltas = [torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])]
    assert elect_signs(deltas, [1.0, 1.0], sign_election="trimmed").tolist() == [1.0, 1.0]


def test_elect_signs_rejects_unknown_rule():
    with pytest.raises(ValueError, match="sign_election must be one of"):
        elect_signs([torch.zeros(2)], [1.0], sign_election="mass")


def test_disjoint_merge_hand_case():
    deltas = [torch.tensor([0.4, -0.2, 0.0]), torch.tensor([0.2, 0.6, 0.0])]
    weights = [1.0, 3.0]
    # γ = sign([0.6, 0.4, 0]) = [+, +, +]; agreeing: {1, 2}, {2}, none.
    # Sum: [0.4 + 0.6, 1.8, 0]. Mean: [1.0 / 4, 1.8 / 3, 0].
    summed = disjoint_merge([d.clone() for d in deltas], weights, sign_election="trimmed", normalize=False)
    torch.testing.assert_close(summed, torch.tensor([1.0, 1.8, 0.0]))
    averaged = disjoint_merge([d.clone() for d in deltas], weights, sign_election="trimmed", normalize=True)
    torch.testing.assert_close(averaged, torch.tensor([0.25, 0.6, 0.0]))


def test_disjoint_merge_zero_divisor_gives_zero():
    # Both models agree, but their weights 1 and −1 cancel in the divisor.
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])]
    merged = disjoint_merge(deltas, [1.0, -1.0], sign_election="trimmed", normalize=True)
    assert merged.tolist() == [0.0, 0.0]


def test_disjoint_merge_matches_masked_reference():
    generator = torch.Generator().manual_seed(3)
    deltas = [torch.randn(200, generator=generator) * (torch.rand(200, generator=generator) > 0.4) for _ in range(3)]
    weights = [0.5, 1.0, 2.0]
    # Straightforward version of the same rule, with masks instead of the clamp arithmetic.
    total = sum(d for d in deltas)
    majority = 1.0 if int((total > 0).sum()) >= int((total < 0).sum()) else -1.0
    signs = torch.where(total == 0, torch.tensor(majority), torch.sign(total))
    selected = [(torch.sign(d) == signs) for d in deltas]
    numerator = sum(torch.where(s, d * w, 0.0) for d, s, w in zip(deltas, selected, weights))
    denominator = sum(s.float() * w for s, w in zip(selected, weights))
    expected = torch.where(denominator == 0, 0.0, numerator / denominator.clamp(min=1e-30))

    merged = disjoint_merge([d.clone() for d in deltas], weights, sign_election="trimmed", normalize=True)
    torch.testing.assert_close(merged, expected)
    summed = disjoint_merge([d.clone() for d in deltas], weights, sign_election="trimmed", normalize=False)
    torch.testing.assert_close(summed, numerator)


def test_elect_signs_rejects_empty_list():
    with pytest.raises(ValueError, match="needs at least one task vector, got none"):
        elect_signs([], [], sign_election="trimmed")


def test_disjoint_merge_explicit_majority():
    deltas = [torch.tensor([0.5, 0.3, 0.2]), torch.tensor([-0.5, 0.1, 0.4])]
    # Σ τ = [0, 0.4, 0.6]: the tensor's own majority is +, but a passed majority wins.
    merged = disjoint_merge(
        [d.clone() for d in deltas], [1.0, 1.0], sign_election="trimmed", normalize=True, majority=-1
    )
    torch.testing.assert_close(merged, torch.tensor([-0.5, 0.2, 0.3]))


def chunked(base: torch.Tensor, deltas: list[torch.Tensor], size: int):
    """Return a `consensus_merge` chunk source that yields fresh copies of each chunk."""

    def chunk_source():
        for start in range(0, base.numel(), size):
            stop = min(base.numel(), start + size)
            yield Chunk(start, stop, base[start:stop], [delta[start:stop].clone() for delta in deltas])

    return chunk_source


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("sign_election", ["trimmed", "weighted"])
def test_consensus_merge_matches_whole_tensor(normalize, sign_election):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(500, generator=generator)
    # Most sums are negative, and the first chunks hold only cancelling pairs, so a chunk's own
    # majority would be wrong there: the whole tensor's majority must be used.
    step = torch.randint(-2, 3, (500,), generator=generator).float()
    drift = torch.where(torch.arange(500) < 200, 0.0, -torch.rand(500, generator=generator))
    deltas = [step, -step, drift]
    weights = [1.0, 1.0, 0.5]

    output = torch.empty(500)
    consensus_merge(
        chunked(base, deltas, 64),
        output,
        weights,
        sign_election=sign_election,
        normalize=normalize,
        scale=0.5,
    )
    expected = disjoint_merge(
        [d.clone() for d in deltas], weights, sign_election=sign_election, normalize=normalize
    ).mul_(0.5).add_(base)
    assert torch.equal(output.view(torch.int32), expected.view(torch.int32))


def test_consensus_merge_rejects_unknown_election():
    with pytest.raises(ValueError, match="sign_election must be one of"):
        consensus_merge(chunked(torch.zeros(2), [torch.ones(2)], 2), torch.empty(2), [1.0],
                        sign_election="mass", normalize=True, scale=1.0)
