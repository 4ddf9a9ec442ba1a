"""Tests of DARE with task arithmetic (dare_linear) and with the TIES merge (dare_ties)."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods.dare import DARE_LINEAR, DARE_TIES
from mergekit_plus.methods.task_arithmetic import METHOD as TASK_ARITHMETIC
from mergekit_plus.methods.ties import METHOD as TIES

BOTH = [DARE_LINEAR, DARE_TIES]


def merge(method, base, tensors, weights, densities, seeds=None, compute_dtype=None, **overrides):
    """Call the operator the way the planner does, with every default filled in.

    The compute dtype defaults to the inputs' dtype.
    """
    params = {p.name: p.default for p in method.global_params} | overrides
    model_params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    if seeds is None:
        seeds = list(range(100, 100 + len(tensors)))
    if compute_dtype is None:
        compute_dtype = tensors[0].dtype
    return method.operator(
        base, tensors, params=params, model_params=model_params, seeds=seeds, compute_dtype=compute_dtype
    )


def random_models(count, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + torch.randn(shape, generator=generator) for _ in range(count)]


def test_dare_declarations():
    for method in BOTH:
        assert method.requires_base is True
        assert method.randomized is True
        density = method.param("density")
        assert density.per_model
        assert density.default == 0.5
        assert (density.minimum, density.maximum) == (0.0, 1.0)
        assert method.param("rescale").default is True
        assert method.param("lambda").default == 1.0
    assert DARE_LINEAR.param("normalize").default is False
    assert DARE_TIES.param("normalize").default is True
    assert DARE_LINEAR.param("sign_election") is None
    assert DARE_TIES.param("sign_election").default == "trimmed"


def test_dare_linear_hand_case_full_density():
    base = torch.tensor([1.0, 2.0])
    tensors = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 5.0])]
    # No drop: θ = [1, 2] + 0.5·(1·[1, 0] + 2·[0, 3]) = [1.5, 5]
    merged = merge(DARE_LINEAR, base, tensors, [1.0, 2.0], [1.0, 1.0], **{"lambda": 0.5})
    torch.testing.assert_close(merged, torch.tensor([1.5, 5.0]))


def test_dare_linear_full_density_is_task_arithmetic():
    base, models = random_models(3, (6, 5))
    weights = [1.0, 0.5, -0.25]
    merged = merge(DARE_LINEAR, base, models, weights, [1.0] * 3, **{"lambda": 0.7})
    expected = TASK_ARITHMETIC.operator(
        base,
        models,
        params={"lambda": 0.7, "normalize": False},
        model_params=[{"weight": w} for w in weights],
        seeds=[0] * 3,
    )
    assert torch.equal(merged, expected)


def test_dare_ties_full_density_is_ties():
    base, models = random_models(3, (6, 5))
    weights = [1.0, 0.5, 2.0]
    for election in ("trimmed", "weighted"):
        merged = merge(DARE_TIES, base, models, weights, [1.0] * 3, sign_election=election)
        expected = TIES.operator(
            base,
            models,
            params={"lambda": 1.0, "normalize": True, "sign_election": election, "scope": "tensor"},
            model_params=[{"weight": w, "density": 1.0} for w in weights],
            seeds=[0] * 3,
        )
        assert torch.equal(merged, expected), election


def test_dare_ties_skips_magnitude_trim():
    base = torch.zeros(4)
    model = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # Density 1 drops nothing, and unlike TIES no small entry is trimmed.
    merged = merge(DARE_TIES, base, [model], [1.0], [1.0])
    assert torch.equal(merged, model)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_density_zero_returns_base(method):
    base, models = random_models(2, (16,))
    merged = merge(method, base, models, [1.0, 1.0], [0.0, 0.0])
    assert torch.equal(merged, base)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_tiny_density_finite(method):
    base, models = random_models(2, (16,))
    # 0.05 · 16 < 1 entry kept on average. A kept entry is rescaled by 20, which must stay finite.
    for seed in range(50):
        merged = merge(method, base, models, [1.0, 1.0], [0.05, 0.05], seeds=[seed, seed + 1000])
        assert bool(torch.isfinite(merged).all())


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_density_one_prunes_nothing(method):
    base = torch.zeros(5)
    model = torch.tensor([1e-6, -2.0, 3.0, -1e-3, 0.5])
    merged = merge(method, base, [model], [1.0], [1.0])
    assert torch.equal(merged, model)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_same_seeds_same_bytes(method):
    base, models = random_models(3, (40, 30))
    first = merge(method, base, models, [1.0] * 3, [0.3] * 3, seeds=[11, 12, 13])
    second = merge(method, base, models, [1.0] * 3, [0.3] * 3, seeds=[11, 12, 13])
    assert torch.equal(first, second)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_other_seeds_other_bytes(method):
    base, models = random_models(3, (40, 30))
    first = merge(method, base, models, [1.0] * 3, [0.3] * 3, seeds=[11, 12, 13])
    second = merge(method, base, models, [1.0] * 3, [0.3] * 3, seeds=[11, 12, 14])
    assert not torch.equal(first, second)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_ignores_tensor_order(method):
    base_a, models_a = random_models(2, (30,), seed=1)
    base_b, models_b = random_models(2, (20, 3), seed=2)
    seeds_a, seeds_b = [5, 6], [7, 8]
    a_first = merge(method, base_a, models_a, [1.0, 1.0], [0.4, 0.4], seeds=seeds_a)
    b_second = merge(method, base_b, models_b, [1.0, 1.0], [0.4, 0.4], seeds=seeds_b)
    b_first = merge(method, base_b, models_b, [1.0, 1.0], [0.4, 0.4], seeds=seeds_b)
    a_second = merge(method, base_a, models_a, [1.0, 1.0], [0.4, 0.4], seeds=seeds_a)
    assert torch.equal(a_first, a_second)
    assert torch.equal(b_first, b_second)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_ignores_thread_count(method):
    base, models = random_models(2, (400, 300))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = merge(method, base, models, [1.0, 0.5], [0.3, 0.6])
        torch.set_num_threads(max(2, previous))
        many_threads = merge(method, base, models, [1.0, 0.5], [0.3, 0.6])
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one_thread, many_threads)


def test_dare_linear_unbiased_over_seeds():
    base = torch.tensor([1.0, -1.0, 0.0, 2.0])
    model = torch.tensor([2.0, -3.0, 0.5, 6.0])
    task_vector = model - base
    draws = 4000
    total = torch.zeros(4)
    for seed in range(draws):
        total += merge(DARE_LINEAR, base, [model], [1.0], [0.5], seeds=[seed]) - base
    # Each draw has standard deviation |τ| at density 0.5, so the mean's is |τ| / 63.
    torch.testing.assert_close(total / draws, task_vector, rtol=0.06, atol=0.0)


def test_dare_linear_zero_fraction():
    base = torch.zeros(100_000)
    model = torch.ones(100_000)
    merged = merge(DARE_LINEAR, base, [model], [1.0], [0.3])
    # The standard deviation of the zero fraction is sqrt(0.3 · 0.7 / 100000), about 0.0015.
    zero_fraction = (merged == 0).float().mean().item()
    assert abs(zero_fraction - 0.7) < 0.01
    assert torch.equal(merged[merged != 0], torch.full_like(merged[merged != 0], 1.0 / 0.3))


def test_dare_linear_without_rescale():
    base = torch.zeros(1000)
    model = torch.full((1000,), 2.0)
    merged = merge(DARE_LINEAR, base, [model], [1.0], [0.5], rescale=False)
    kept = merged[merged != 0]
    assert kept.numel() > 0
    assert torch.equal(kept, torch.full_like(kept, 2.0))


def test_dare_ties_elects_after_drop():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-0.5, -0.5, -0.5])]
    # Density 1: trimmed election picks +, weighted (0.2 − 0.5 < 0) picks −.
    trimmed = merge(DARE_TIES, base, models, [0.2, 1.0], [1.0, 1.0])
    torch.testing.assert_close(trimmed, torch.full((3,), 1.0))
    weighted = merge(DARE_TIES, base, models, [0.2, 1.0], [1.0, 1.0], sign_election="weighted")
    torch.testing.assert_close(weighted, torch.full((3,), -0.5))


def test_dare_linear_check_zero_weight_sum():
    problems = DARE_LINEAR.check(
        {"normalize": True, "lambda": 1.0, "rescale": True}, [{"weight": 1.0, "density": 0.5}, {"weight": -1.0, "density": 0.5}]
    )
    assert len(problems) == 1
    assert "sum to 0" in problems[0]


def test_dare_linear_operator_rejects_zero_sum():
    base, models = random_models(2, (4,))
    with pytest.raises(ValueError, match=r"the weights \[1, -1\] sum to 0"):
        merge(DARE_LINEAR, base, models, [1.0, -1.0], [0.5, 0.5], normalize=True)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_rejects_missing_seeds(method):
    base, models = random_models(2, (4,))
    with pytest.raises(ValueError, match="needs one seed per model: got 1 seeds for 2 models"):
        merge(method, base, models, [1.0, 1.0], [0.5, 0.5], seeds=[1])


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_requires_base(method):
    with pytest.raises(ValueError, match="needs a base model tensor"):
        merge(method, None, [torch.ones(2)], [1.0], [0.5])


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dare_half_precision(method, dtype):
    base, models = random_models(2, (64,))
    merged = merge(method, base.to(dtype), [m.to(dtype) for m in models], [1.0, 1.0], [0.5, 0.5])
    assert merged.dtype == dtype
    assert bool(torch.isfinite(merged).all())
    # Density 1 returns θ₀ + (θ₁ − θ₀), which is θ₁ up to half-precision rounding.
    full = merge(method, base.to(dtype), [models[0].to(dtype)], [1.0], [1.0])
    torch.testing.assert_close(full.float(), models[0], atol=0.02, rtol=0.01)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_leaves_inputs(method):
    base, models = random_models(2, (8, 8))
    copies = [base.clone(), *(m.clone() for m in models)]
    merged = merge(method, base, models, [1.0, 1.0], [0.5, 0.5])
    for tensor, copy in zip([base, *models], copies):
        assert torch.equal(tensor, copy)
        assert merged.data_ptr() != tensor.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
def test_dare_cuda_matches_cpu(method):
    base, models = random_models(2, (64, 48))
    on_cpu = merge(method, base, models, [1.0, 0.5], [0.3, 0.6])
    on_cuda = merge(method, base.cuda(), [m.cuda() for m in models], [1.0, 0.5], [0.3, 0.6])
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), on_cpu)


@pytest.mark.parametrize("method", BOTH, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0)])
def test_dare_scalar_and_empty_tensors(method, shape):
    base = torch.full(shape, 0.5)
    model = torch.full(shape, 1.5)
    assert torch.equal(merge(method, base, [model], [1.0], [1.0]), model)
    assert torch.equal(merge(method, base, [model], [1.0], [0.0]), base)
    assert merge(method, base, [model], [1.0], [0.5]).shape == torch.Size(shape)
