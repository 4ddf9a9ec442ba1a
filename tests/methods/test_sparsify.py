"""Tests of the shared sparsification steps: top-k mask, DARE drop, sign election, disjoint merge."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods import sparsify
from mergekit_plus.methods.sparsify import (
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
def test_magnitude_mask_small_blocks(monkeypatch, dtype):
    # Blocks of 16 entries send the float32 path through many blocks, with sparse and dense buckets.
    monkeypatch.setattr(sparsify, "_BLOCK", 16)
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


def test_random_mask_keep_fraction():
    mask = random_keep_mask(torch.Size([200_000]), 0.3, 11, torch.device("cpu"))
    # The standard deviation of the fraction is sqrt(0.3 * 0.7 / 200000), about 0.001.
    assert abs(mask.float().mean().item() - 0.3) < 0.01


def test_random_mask_density_edges():
    assert bool(random_keep_mask(torch.Size([64]), 1.0, 0, torch.device("cpu")).all())
    assert not bool(random_keep_mask(torch.Size([64]), 0.0, 0, torch.device("cpu")).any())


def test_drop_and_rescale_values():
    delta = torch.arange(1.0, 1001.0)
    dropped = drop_and_rescale(delta.clone(), 0.25, 5, rescale=True)
    kept = dropped != 0
    assert torch.equal(dropped[kept], delta[kept] / 0.25)
    unscaled = drop_and_rescale(delta.clone(), 0.25, 5, rescale=False)
    assert torch.equal(unscaled != 0, kept)
    assert torch.equal(unscaled[kept], delta[kept])


def test_drop_and_rescale_density_edges():
    delta = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(drop_and_rescale(delta.clone(), 0.0, 0, rescale=True), torch.zeros(3))
    assert torch.equal(drop_and_rescale(delta.clone(), 1.0, 0, rescale=True), delta)


def test_drop_and_rescale_unbiased():
    delta = torch.tensor([1.0, -2.0, 0.5, 4.0])
    total = torch.zeros(4)
    draws = 4000
    for seed in range(draws):
        total += drop_and_rescale(delta.clone(), 0.5, seed, rescale=True)
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
