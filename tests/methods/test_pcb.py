"""Tests of the PCB-Merging operator, its whole-model statistics and its checks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from mergekit_plus.methods import get_method
from mergekit_plus.methods.base import MergeTarget
from mergekit_plus.methods.pcb import (
    METHOD,
    BalanceStatistics,
    LargestMagnitude,
    check_model_scope,
    check_params,
    reference_balance,
)
from reference_vectors import BASE, TASK_VECTORS

# The PCB test vector: three task vectors of six entries, merged by the reference code's variant
# with r = 0.5, clamp ratio 0 and N = 3. β₁ = exp(3·Norm(|τ₁|)²) ⊙ tanh(τ₁ ⊙ Σⱼ τⱼ), and so on.
BETAS = [
    [3.9644, 0.1290, -0.0507, 0.0, 0.1765, -0.0036],
    [-3.1865, 0.6456, -0.0236, 0.0846, 0.0, 0.0084],
    [0.2528, -0.0435, 5.2950, 0.0, -0.0217, 0.0014],
]
SCORES = [
    [1.0, 0.0, 0.0, 0.0, 0.0124, 0.0],
    [0.0, 1.0, 0.0, 0.1196, 0.0, 0.0],
    [0.0475, 0.0, 1.0, 0.0, 0.0, 0.0],
]
# The last entry has every score 0, so it is 0 / 1e−12 = 0.
MERGED = [0.4909, -0.3, -0.6, 0.2, 0.3, 0.0]


def params(**overrides):
    return {p.name: p.default for p in METHOD.global_params} | overrides


def merge(base, models, weights=None, **overrides):
    weights = weights or [1.0] * len(models)
    statistics = overrides.pop("statistics", None)
    return METHOD.operator(base, models, params=params(**overrides), model_params=[{"weight": w} for w in weights],
                           seeds=[0] * len(models), statistics=statistics)


def vector_inputs(dtype=torch.float32):
    base = torch.tensor(BASE, dtype=dtype)
    return base, [base + torch.tensor(row, dtype=dtype) for row in TASK_VECTORS]


def exact_floor(fraction: float, count: int) -> int:
    return math.floor(Fraction(str(fraction)) * count)


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Min–max normalise each row, with 0 for a constant row."""
    low = values.min(dim=-1, keepdim=True).values
    high = values.max(dim=-1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, 1), torch.zeros(()))


def formula_pcb(task_vectors: torch.Tensor, *, density: float, clamp_ratio: float, variant: str,
                weights: list[float] | None = None) -> torch.Tensor:
    """PCB over whole rows (one row per task vector), written from the formulas with sorts and softmaxes."""
    count, d = task_vectors.shape
    magnitudes = task_vectors.abs()
    clamped = task_vectors
    if variant == "reference" or clamp_ratio > 0:
        ordered = magnitudes.sort(dim=1).values
        low = ordered[:, exact_floor(clamp_ratio, d)].unsqueeze(1)
        high = ordered[:, exact_floor(1 - clamp_ratio, d) - 1].unsqueeze(1)
        magnitudes = torch.minimum(torch.maximum(magnitudes, low), high)
        clamped = torch.sign(task_vectors) * magnitudes

    if variant == "reference":
        intra = torch.exp(count * min_max(magnitudes) ** 2)
        inter = torch.tanh(task_vectors * task_vectors.sum(0))
        beta = intra * inter
        floor = beta.sort(dim=1).values[:, exact_floor(1 - density, d)].unsqueeze(1)
        ceiling = beta.max(dim=1, keepdim=True).values
        scores = min_max(torch.minimum(torch.maximum(beta, floor), ceiling))
    else:
        intra = torch.softmax(count * min_max(clamped * clamped), dim=1)
        inter = sum(torch.softmax(min_max(clamped * clamped[j]), dim=1) for j in range(count))
        beta = intra * inter
        kept = exact_floor(density, d)
        cut = beta.topk(kept, dim=1).values[:, -1:] if kept else torch.full((count, 1), math.inf, dtype=beta.dtype)
        scores = beta * (beta >= cut)

    weight = torch.tensor(weights or [1.0] * count, dtype=task_vectors.dtype).unsqueeze(1)
    return (weight * scores * clamped).sum(0) / scores.sum(0).clamp(min=1e-12)


def run_statistics(pieces, *, variant, density, clamp_ratio, compute_dtype=torch.float32):
    """Run the statistics passes over `pieces` [(base, [model, ...]), ...] as the executor does."""
    count = len(pieces[0][1])
    numels = [sum(base.numel() for base, _ in pieces)] * count
    reducer = BalanceStatistics(variant=variant, density=density, clamp_ratio=clamp_ratio, numels=numels,
                                compute_dtype=compute_dtype)
    passes = 0
    while not reducer.done:
        passes += 1
        for index, (base, models) in enumerate(pieces):
            reducer.update(f"tensor.{index}", base, models, models=range(count),
                           params=params(variant=variant, density=density, clamp_ratio=clamp_ratio),
                           model_params=[{"weight": 1.0}] * count)
        reducer.finish_pass()
    assert passes <= reducer.max_passes
    return reducer.result()


def random_inputs(count: int, numel: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator)
    models = [base + 0.01 * torch.randn(numel, generator=generator) for _ in range(count)]
    return base, models


# The test vector


def test_reference_vector_balance():
    deltas = [torch.tensor(row) for row in TASK_VECTORS]
    clamps = [(float(delta.abs().min()), float(delta.abs().max())) for delta in deltas]

    betas = reference_balance(deltas, clamps)

    for beta, expected in zip(betas, BETAS):
        torch.testing.assert_close(beta, torch.tensor(expected), atol=1e-4, rtol=0)


def test_reference_vector_merge():
    base, models = vector_inputs()

    merged = merge(base, models, density=0.5, clamp_ratio=0.0, variant="reference", scope="tensor")

    torch.testing.assert_close(merged - base, torch.tensor(MERGED), atol=1e-4, rtol=0)
    assert merged[5] == base[5]


def test_reference_vector_scores():
    """The soft mask of the test vector's β, and the merge the formula gives from it."""
    beta = torch.tensor(BETAS, dtype=torch.float64)
    floor = beta.sort(dim=1).values[:, 3].unsqueeze(1)
    scores = min_max(torch.minimum(torch.maximum(beta, floor), beta.max(dim=1, keepdim=True).values))
    expected = formula_pcb(torch.tensor(TASK_VECTORS, dtype=torch.float64), density=0.5, clamp_ratio=0.0,
                           variant="reference")

    torch.testing.assert_close(scores, torch.tensor(SCORES, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(expected, torch.tensor(MERGED, dtype=torch.float64), atol=1e-4, rtol=0)


def test_lambda_scales_merged_vector():
    base, models = vector_inputs()

    merged = merge(base, models, density=0.5, variant="reference", scope="tensor", **{"lambda": 0.5})

    torch.testing.assert_close(merged - base, 0.5 * torch.tensor(MERGED), atol=1e-4, rtol=0)


def test_paper_vector_matches_formula():
    base, models = vector_inputs(torch.float64)
    expected = formula_pcb(torch.tensor(TASK_VECTORS, dtype=torch.float64), density=0.5, clamp_ratio=0.0,
                           variant="paper")

    merged = METHOD.operator(base, models, params=params(density=0.5, scope="tensor"),
                             model_params=[{"weight": 1.0}] * 3, seeds=[0] * 3, compute_dtype=torch.float64)

    torch.testing.assert_close(merged - base, expected)


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("clamp_ratio", [0.0, 0.01])
def test_tensor_scope_matches_formula(variant, clamp_ratio):
    base, models = random_inputs(3, 4000)
    weights = [1.0, 0.5, 2.0]
    expected = formula_pcb(torch.stack([model - base for model in models]), density=0.2, clamp_ratio=clamp_ratio,
                           variant=variant, weights=weights)

    merged = merge(base, models, weights, density=0.2, clamp_ratio=clamp_ratio, variant=variant, scope="tensor")

    torch.testing.assert_close(merged - base, expected, rtol=1e-4, atol=1e-6)


# Invariants


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("clamp_ratio", [0.0, 0.1])
def test_identical_task_vectors_give_clamped_vector(variant, clamp_ratio):
    """With T equal rows the scores cancel in the ratio: τ_m is the clamped vector where it is kept, else 0."""
    generator = torch.Generator().manual_seed(1)
    task_vector = torch.randn(200, generator=generator)
    base = torch.zeros(200)
    models = [task_vector.clone() for _ in range(3)]
    ordered = task_vector.abs().sort().values
    low, high = ordered[exact_floor(clamp_ratio, 200)], ordered[exact_floor(1 - clamp_ratio, 200) - 1]
    clamped = torch.sign(task_vector) * task_vector.abs().clamp(low, high)

    merged = merge(base, models, density=0.3, clamp_ratio=clamp_ratio, variant=variant, scope="tensor")

    kept = merged != 0
    assert 0 < int(kept.sum()) <= 61
    torch.testing.assert_close(merged[kept], clamped[kept] if clamp_ratio or variant == "reference"
                               else task_vector[kept])


def test_density_zero_returns_base():
    base, models = vector_inputs()

    for variant in ("paper", "reference"):
        merged = merge(base, models, density=0.0, variant=variant, scope="tensor")
        torch.testing.assert_close(merged, base)


def test_density_one_paper_keeps_every_entry():
    base, models = vector_inputs(torch.float64)
    expected = formula_pcb(torch.tensor(TASK_VECTORS, dtype=torch.float64), density=1.0, clamp_ratio=0.0,
                           variant="paper")

    merged = METHOD.operator(base, models, params=params(density=1.0, scope="tensor"),
                             model_params=[{"weight": 1.0}] * 3, seeds=[0] * 3, compute_dtype=torch.float64)

    torch.testing.assert_close(merged - base, expected)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_constant_rows_give_no_nan(variant):
    """An unchanged model (τ = 0) and a constant τ have a zero min–max range, normalised to 0, not 0/0."""
    base = torch.linspace(-1, 1, 12)
    models = [base.clone(), base + 0.25, base + torch.linspace(-0.1, 0.3, 12)]

    merged = merge(base, models, density=0.5, variant=variant, scope="tensor")

    assert torch.isfinite(merged).all()
    assert torch.equal(merge(base, [base.clone(), base.clone()], variant=variant, scope="tensor"), base)


def test_inputs_unchanged():
    base, models = vector_inputs()
    copies = [base.clone()] + [model.clone() for model in models]

    merge(base, models, density=0.5, variant="reference", scope="tensor")

    for original, copy in zip([base, *models], copies):
        assert torch.equal(original, copy)


def test_bfloat16_inputs_merge_in_float32():
    base, models = random_inputs(2, 512)
    low = [tensor.to(torch.bfloat16) for tensor in [base, *models]]

    merged = merge(low[0], low[1:], scope="tensor")
    expected = merge(low[0].float(), [model.float() for model in low[1:]], scope="tensor")

    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected)


# Whole-model statistics


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("clamp_ratio", [0.0, 0.02])
def test_model_scope_matches_tensor_scope_of_concatenation(variant, clamp_ratio):
    base, models = random_inputs(3, 3000, seed=2)
    bounds = [(0, 1000), (1000, 1100), (1100, 3000)]
    pieces = [(base[start:stop].view(-1, 10), [model[start:stop].view(-1, 10) for model in models])
              for start, stop in bounds]
    options = {"variant": variant, "density": 0.15, "clamp_ratio": clamp_ratio}

    statistics = run_statistics(pieces, **options)
    merged = torch.cat([merge(piece_base, piece_models, scope="model", statistics=statistics, **options).reshape(-1)
                        for piece_base, piece_models in pieces])

    torch.testing.assert_close(merged, merge(base, models, scope="tensor", **options), rtol=0, atol=0)


def test_statistics_describe_kept_entries():
    base, models = vector_inputs()

    statistics = run_statistics([(base, models)], variant="paper", density=0.5, clamp_ratio=0.0)

    assert [balance.kept for balance in statistics] == [3, 3, 3]
    assert statistics[0].describe() == "PCB keeps 3 of 6 task-vector entries"


def test_statistics_reject_wrong_entry_count():
    base, models = vector_inputs()
    reducer = BalanceStatistics(variant="paper", density=0.5, clamp_ratio=0.0, numels=[7, 7, 7],
                                compute_dtype=torch.float32)
    reducer.update("t", base, models, models=range(3), params=params(), model_params=[{"weight": 1.0}] * 3)

    with pytest.raises(RuntimeError, match="saw 6 entries .* but the plan counts 7"):
        reducer.finish_pass()


def test_model_scope_requires_statistics():
    base, models = vector_inputs()

    with pytest.raises(ValueError, match="needs the whole-model PCB statistics"):
        merge(base, models, scope="model")


def test_tensor_scope_rejects_statistics():
    base, models = vector_inputs()
    statistics = run_statistics([(base, models)], variant="paper", density=0.5, clamp_ratio=0.0)

    with pytest.raises(ValueError, match="takes no whole-model statistics"):
        merge(base, models, scope="tensor", statistics=statistics)


@pytest.mark.parametrize("k", [1, 2, 7, 500, 999, 1000])
def test_largest_magnitude_matches_sort(k):
    generator = torch.Generator().manual_seed(k)
    values = torch.randn(1000, generator=generator)
    values[::7] = 0.5  # ties straddle several ranks
    statistic = LargestMagnitude(k, 1000, torch.float32)

    while not statistic.done:
        for chunk in values.split(300):
            statistic.count(chunk.contiguous())
        statistic.finish_pass()

    assert statistic.value == float(values.abs().sort(descending=True).values[k - 1])


# Checks


def test_registered():
    assert get_method("pcb") is METHOD


def test_clamp_ratio_at_half_rejected():
    problems = check_params(params(clamp_ratio=0.5), [{"weight": 1.0}])

    assert len(problems) == 1
    assert "`clamp_ratio` is 0.5, but it must be below 0.5" in problems[0]


def target(name, **overrides):
    return MergeTarget(name=name, params=params(**overrides), model_params=({"weight": 1.0},) * 2, model_numel=(4, 4))


def test_model_scope_density_varying_by_tensor_rejected():
    problems = check_model_scope([target("a", density=0.1), target("b", density=0.2)])

    assert len(problems) == 1
    assert "`density` varies by tensor (0.1 for a, 0.2 for b)" in problems[0]
    assert "set `scope: tensor`" in problems[0]


def test_tensor_scope_density_may_vary():
    assert check_model_scope([target("a", density=0.1, scope="tensor"),
                              target("b", density=0.2, scope="tensor")]) == []


def test_scope_varying_by_tensor_rejected():
    problems = check_model_scope([target("a", scope="model"), target("b", scope="tensor")])

    assert len(problems) == 1
    assert "`scope` varies by tensor" in problems[0]
