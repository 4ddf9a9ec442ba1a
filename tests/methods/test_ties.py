"""Tests of TIES-Merging."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods import chunks
from mergekit_plus.methods.task_arithmetic import METHOD as TASK_ARITHMETIC
from mergekit_plus.methods.ties import METHOD
from reference_vectors import BASE, TASK_VECTORS

# Three task vectors of six entries, with their TIES results worked out by hand below.


def merge(base, tensors, weights, densities, compute_dtype=None, **overrides):
    """Call the operator the way the planner does, with every default filled in but `scope: tensor`.

    These tests are about the trim within one tensor, so the whole-model trim is not used here.
    The compute dtype defaults to the inputs' dtype.
    """
    params = {p.name: p.default for p in METHOD.global_params} | {"scope": "tensor"} | overrides
    model_params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    if compute_dtype is None:
        compute_dtype = tensors[0].dtype
    return METHOD.operator(
        base, tensors, params=params, model_params=model_params, seeds=[0] * len(tensors), compute_dtype=compute_dtype
    )


def models_from(task_vectors, base, dtype=torch.float64):
    base_tensor = torch.tensor(base, dtype=dtype)
    return base_tensor, [base_tensor + torch.tensor(tv, dtype=dtype) for tv in task_vectors]


def test_ties_declaration():
    assert METHOD.requires_base is True
    assert METHOD.randomized is False
    density = METHOD.param("density")
    assert density.per_model
    assert density.default == 0.2
    assert (density.minimum, density.maximum) == (0.0, 1.0)
    assert METHOD.param("normalize").default is True
    assert METHOD.param("lambda").default == 1.0
    election = METHOD.param("sign_election")
    assert election.default == "trimmed"
    assert election.choices == ("trimmed", "weighted")
    scope = METHOD.param("scope")
    assert not scope.per_model
    assert scope.default == "model"
    assert set(scope.choices) == {"model", "tensor"}
    assert METHOD.statistics is not None
    assert METHOD.check_model is not None


def test_ties_reference_vector_dis_mean():
    base, models = models_from(TASK_VECTORS, BASE)
    # Density 4/6 keeps 4 of 6 entries per row:
    #   τ̂₁ = [0.5, −0.2, 0.1, 0, 0.3, 0]
    #   τ̂₂ = [−0.4, −0.3, 0, 0.2, 0, 0.1]
    #   τ̂₃ = [0.3, 0.1, −0.6, 0, −0.1, 0]   (0.1 at index 1 and −0.1 at index 4 tie; both fit)
    # Σ τ̂ = [0.4, −0.4, −0.5, 0.2, 0.2, 0.1], so γ = [+, −, −, +, +, +].
    # Mean over agreeing entries: [(0.5+0.3)/2, (−0.2−0.3)/2, −0.6, 0.2, 0.3, 0.1].
    merged = merge(base, models, [1.0] * 3, [4 / 6] * 3)
    expected = torch.tensor(BASE, dtype=torch.float64) + torch.tensor([0.4, -0.25, -0.6, 0.2, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


def test_ties_reference_vector_dis_sum():
    base, models = models_from(TASK_VECTORS, BASE)
    merged = merge(base, models, [1.0] * 3, [4 / 6] * 3, normalize=False)
    expected = torch.tensor(BASE, dtype=torch.float64) + torch.tensor([0.8, -0.5, -0.6, 0.2, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


def test_ties_lambda_scales_merge():
    base, models = models_from(TASK_VECTORS, BASE)
    merged = merge(base, models, [1.0] * 3, [4 / 6] * 3, normalize=False, **{"lambda": 0.5})
    expected = torch.tensor(BASE, dtype=torch.float64) + 0.5 * torch.tensor([0.8, -0.5, -0.6, 0.2, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


def test_ties_trim_breaks_ties_by_index():
    base = torch.zeros(4)
    model = torch.tensor([0.3, -0.3, 0.3, 0.1])
    # k = floor(0.5 · 4) = 2; three entries tie at 0.3, the first two are kept.
    merged = merge(base, [model], [1.0], [0.5])
    torch.testing.assert_close(merged, torch.tensor([0.3, -0.3, 0.0, 0.0]))


def test_ties_trim_ties_straddle_chunks(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 4)
    base = torch.zeros(8)
    model = torch.tensor([0.3, 0.1, 0.3, 0.3, 0.3, 0.1, 0.3, 0.2])
    # k = 4 of five entries tied at 0.3: the kept ties run from the first chunk into the second,
    # and the fifth one, in the second chunk too, is dropped.
    merged = merge(base, [model], [1.0], [0.5])
    assert merged.tolist() == pytest.approx([0.3, 0.0, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0])


def test_ties_bfloat16_inputs_in_float64():
    base, models = models_from(TASK_VECTORS, BASE, dtype=torch.bfloat16)
    merged = merge(base, models, [1.0] * 3, [4 / 6] * 3, compute_dtype=torch.float64)
    assert merged.dtype == torch.float64
    widened = merge(base.double(), [m.double() for m in models], [1.0] * 3, [4 / 6] * 3)
    assert torch.equal(merged, widened)


def test_ties_trimmed_election_follows_paper():
    base = torch.zeros(4)
    model_a = torch.full((4,), 1.0)
    model_b = torch.full((4,), -0.5)
    # Σ τ̂ = +0.5 elects +, so only A is merged: (0.2 · 1) / 0.2 = 1.
    merged = merge(base, [model_a, model_b], [0.2, 1.0], [1.0, 1.0])
    torch.testing.assert_close(merged, torch.full((4,), 1.0))
    # Without normalize the merged value is 0.2 · 1.
    plain = merge(base, [model_a, model_b], [0.2, 1.0], [1.0, 1.0], normalize=False)
    torch.testing.assert_close(plain, torch.full((4,), 0.2))


def test_ties_weighted_election_follows_mergekit():
    base = torch.zeros(4)
    model_a = torch.full((4,), 1.0)
    model_b = torch.full((4,), -0.5)
    # Σ w τ̂ = 0.2 − 0.5 = −0.3 elects −, so only B is merged: (1.0 · −0.5) / 1.0.
    merged = merge(base, [model_a, model_b], [0.2, 1.0], [1.0, 1.0], sign_election="weighted")
    torch.testing.assert_close(merged, torch.full((4,), -0.5))


def test_ties_zero_sum_takes_majority_sign():
    base = torch.zeros(3)
    models = [torch.tensor([0.5, 0.3, 0.2]), torch.tensor([-0.5, 0.1, 0.4])]
    # Σ τ = [0, 0.4, 0.6]: the majority is +, so index 0 keeps only the first model.
    merged = merge(base, models, [1.0, 1.0], [1.0, 1.0])
    torch.testing.assert_close(merged, torch.tensor([0.5, 0.2, 0.3]))


def test_ties_zero_sum_negative_majority():
    base = torch.zeros(3)
    models = [torch.tensor([0.5, -0.3, -0.2]), torch.tensor([-0.5, -0.1, -0.4])]
    # Σ τ = [0, −0.4, −0.6]: the majority is −, so index 0 keeps only the second model.
    merged = merge(base, models, [1.0, 1.0], [1.0, 1.0])
    torch.testing.assert_close(merged, torch.tensor([-0.5, -0.2, -0.3]))


def test_ties_full_density_no_conflict_is_sum():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    # All task vectors positive, so every entry agrees with the elected sign.
    models = [base + torch.rand(4, 5, generator=generator, dtype=torch.float64) + 0.01 for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    merged = merge(base, models, weights, [1.0] * 3, normalize=False)
    params = {"lambda": 1.0, "normalize": False}
    expected = TASK_ARITHMETIC.operator(
        base,
        models,
        params=params,
        model_params=[{"weight": w} for w in weights],
        seeds=[0, 0, 0],
        compute_dtype=torch.float64,
    )
    torch.testing.assert_close(merged, expected)


def test_ties_full_density_mean_of_contributors():
    base = torch.zeros(3)
    models = [torch.tensor([0.3, 0.0, 0.6]), torch.tensor([0.1, 0.2, 0.0])]
    # Mean over the nonzero entries only: [(0.3+0.1)/2, 0.2, 0.6].
    merged = merge(base, models, [1.0, 1.0], [1.0, 1.0])
    torch.testing.assert_close(merged, torch.tensor([0.2, 0.2, 0.6]))


def test_ties_density_zero_returns_base():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(16, generator=generator)
    models = [torch.randn(16, generator=generator) for _ in range(2)]
    merged = merge(base, models, [1.0, 1.0], [0.0, 0.0])
    assert torch.equal(merged, base)


def test_ties_density_below_one_entry_returns_base():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(16, generator=generator)
    models = [torch.randn(16, generator=generator) for _ in range(2)]
    # 0.05 · 16 = 0.8 keeps no entry.
    for normalize in (True, False):
        merged = merge(base, models, [1.0, 1.0], [0.05, 0.05], normalize=normalize)
        assert torch.equal(merged, base)


def test_ties_density_one_prunes_nothing():
    base = torch.zeros(5)
    model = torch.tensor([1e-6, -2.0, 3.0, -1e-3, 0.5])
    merged = merge(base, [model], [1.0], [1.0])
    assert torch.equal(merged, model)


def test_ties_cancelling_weights_never_nan():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, 2.0, -2.0])]
    merged = merge(base, models, [1.0, -1.0], [1.0, 1.0])
    # Both models agree everywhere and their weights sum to 0 there, so the merge is 0, not NaN.
    assert merged.tolist() == [0.0, 0.0, 0.0]


def test_ties_rejects_unknown_election():
    with pytest.raises(ValueError, match="sign_election must be one of"):
        merge(torch.zeros(2), [torch.ones(2)], [1.0], [1.0], sign_election="mass")


def test_ties_requires_base():
    with pytest.raises(ValueError, match="ties needs a base model tensor"):
        merge(None, [torch.ones(2)], [1.0], [1.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_half_precision(dtype):
    base, models = models_from(TASK_VECTORS, BASE, dtype=dtype)
    merged = merge(base, models, [1.0] * 3, [4 / 6] * 3, normalize=False)
    assert merged.dtype == dtype
    expected = torch.tensor(BASE) + torch.tensor([0.8, -0.5, -0.6, 0.2, 0.3, 0.1])
    torch.testing.assert_close(merged.float(), expected, atol=0.02, rtol=0.01)


def test_ties_leaves_inputs():
    base, models = models_from(TASK_VECTORS, BASE)
    copies = [base.clone(), *(m.clone() for m in models)]
    merged = merge(base, models, [1.0] * 3, [0.5] * 3)
    for tensor, copy in zip([base, *models], copies):
        assert torch.equal(tensor, copy)
        assert merged.data_ptr() != tensor.data_ptr()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0)])
def test_ties_scalar_and_empty_tensors(shape):
    base = torch.full(shape, 0.5)
    models = [torch.full(shape, 1.5), torch.full(shape, -0.5)]
    merged = merge(base, models, [1.0, 1.0], [1.0, 1.0])
    assert merged.shape == torch.Size(shape)
    # Σ τ = 1 − 1 = 0 at the only coordinate; the majority rule then elects +.
    assert torch.equal(merged, torch.full(shape, 1.5))
    trimmed_away = merge(base, models, [1.0, 1.0], [0.2, 0.2])
    assert torch.equal(trimmed_away, base)
