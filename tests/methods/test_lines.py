"""Tests of the LiNeS operator, its schedule, its α statistics and its parameter checks."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods import chunks, get_method, sparsify
from mergekit_plus.methods import task_arithmetic, ties
from mergekit_plus.methods.base import MergeTarget, TensorLayer
from mergekit_plus.methods.lines import (
    METHOD,
    ModelEntry,
    NormStatistics,
    check_model,
    check_params,
    layer_scale,
    operator,
)
from reference_vectors import BASE, TASK_VECTORS

# The shared test vectors: three task vectors of six entries, their sum, and their TIES dis-mean
# with a whole-model trim at density 0.5 (four entries of each kept, counting ties).
TASK_SUM = [0.4, -0.4, -0.45, 0.2, 0.2, 0.07]
TIES_DIS_MEAN = [0.4, -0.25, -0.6, 0.2, 0.3, 0.1]

# λ(ℓ) for L = 12, T = 8 with task arithmetic (α = 1/8) and β = 0.5, to four decimals.
VIT_B_SCHEDULE = [0.125, 0.1705, 0.2159, 0.2614, 0.3068, 0.3523, 0.3977, 0.4432, 0.4886, 0.5341, 0.5795, 0.625]


def vectors(dtype=torch.float64):
    base = torch.tensor(BASE, dtype=dtype)
    models = [base + torch.tensor(task_vector, dtype=dtype) for task_vector in TASK_VECTORS]
    return base, models


def lines_params(**overrides):
    return {p.name: p.default for p in METHOD.global_params} | overrides


def lines_model_params(count, **overrides):
    defaults = {p.name: p.default for p in METHOD.model_params}
    return [defaults | overrides for _ in range(count)]


def run_lines(base, models, *, layer, statistics=None, model_params=None, compute_dtype=torch.float64, **params):
    return operator(base, models, params=lines_params(**params),
                    model_params=model_params or lines_model_params(len(models)), seeds=(),
                    compute_dtype=compute_dtype, statistics=statistics, layer=layer)


def gather(reducer, tensors):
    """Run a reducer's passes as the executor does, over (name, base, models, params, model_params) tuples."""
    while not reducer.done:
        for name, base, models, params, model_params in tensors:
            reducer.update(name, base, models, models=range(len(models)), params=params, model_params=model_params)
        reducer.finish_pass()
    return reducer.result()


def target(name, params, model_params, numel, layer=None):
    return MergeTarget(name, params, tuple(model_params), (numel,) * len(model_params), layer)


# The schedule


def test_schedule_matches_vit_b_example():
    scales = [layer_scale(1 / 8, 0.5, TensorLayer(index, 12)) for index in range(12)]

    assert scales == pytest.approx(VIT_B_SCHEDULE, abs=5e-5)
    assert scales[0] == 0.125
    assert scales[-1] == 0.625


def test_schedule_outside_blocks_is_alpha():
    assert layer_scale(0.3, 0.6, TensorLayer(None, 12)) == 0.3


def test_schedule_one_block_is_alpha():
    assert layer_scale(0.3, 0.6, TensorLayer(0, 1)) == 0.3


def test_schedule_rejects_index_past_count():
    with pytest.raises(ValueError, match="block index 12 is outside the model's 12 blocks"):
        layer_scale(0.3, 0.6, TensorLayer(12, 12))


# The operator against hand-computed values


@pytest.mark.parametrize("index, scale", [(None, 0.2), (0, 0.2), (1, 0.5), (2, 0.8)])
def test_task_arithmetic_hand_computed(index, scale):
    base, models = vectors()

    merged = run_lines(base, models, layer=TensorLayer(index, 3), alpha=0.2, beta=0.6)

    expected = torch.tensor(BASE, dtype=torch.float64) + scale * torch.tensor(TASK_SUM, dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


def test_weights_scale_task_vectors():
    base, models = vectors()
    model_params = [{"weight": weight, "density": 0.2} for weight in (1.0, 0.5, 2.0)]

    merged = run_lines(base, models, layer=TensorLayer(1, 3), model_params=model_params, alpha=0.2, beta=0.6)

    task_vectors = torch.tensor(TASK_VECTORS, dtype=torch.float64)
    weighted = task_vectors[0] + 0.5 * task_vectors[1] + 2.0 * task_vectors[2]
    torch.testing.assert_close(merged, torch.tensor(BASE, dtype=torch.float64) + 0.5 * weighted)


def test_ties_hand_computed_with_model_thresholds():
    """The whole-model trim keeps four entries of each task vector, so τ_MTL is the test vectors' dis-mean."""
    base, models = vectors(torch.float32)
    params = lines_params(inner="ties", alpha=0.2, beta=0.6)
    model_params = lines_model_params(3, density=0.5)
    thresholds = gather(NormStatistics.for_targets([target("w", params, model_params, 6)], torch.float32),
                        [("w", base, models, params, model_params)])

    merged = operator(base, models, params=params, model_params=model_params, seeds=(), statistics=thresholds,
                      layer=TensorLayer(2, 3))

    torch.testing.assert_close(merged, torch.tensor(BASE) + 0.8 * torch.tensor(TIES_DIS_MEAN))


def test_ties_rejects_model_scope_without_thresholds():
    base, models = vectors()

    with pytest.raises(ValueError, match="needs one whole-model trim threshold per model"):
        run_lines(base, models, layer=TensorLayer(0, 3), inner="ties", alpha=0.2, beta=0.6)


def test_single_task_editing_defaults_beta():
    """One model with α = 0.4: β = 1 − α, so the last block keeps the whole fine-tune."""
    base, models = vectors()
    task_vector = models[0] - base

    first = run_lines(base, models[:1], layer=TensorLayer(0, 4), alpha=0.4)
    last = run_lines(base, models[:1], layer=TensorLayer(3, 4), alpha=0.4)

    torch.testing.assert_close(first, base + 0.4 * task_vector)
    torch.testing.assert_close(last, models[0])


def test_single_task_without_alpha_keeps_fine_tune():
    """One model, α and β unset: α = 1/T = 1 and β = 0, so every tensor is the fine-tune's."""
    base, models = vectors()

    merged = run_lines(base, models[:1], layer=TensorLayer(0, 4))

    torch.testing.assert_close(merged, models[0])


def test_operator_needs_layer():
    base, models = vectors()

    with pytest.raises(ValueError, match="needs the tensor's block as `layer`"):
        run_lines(base, models, layer=None, alpha=0.2, beta=0.6)


def test_operator_rejects_consensus():
    base, models = vectors()

    with pytest.raises(NotImplementedError, match="inner: consensus"):
        run_lines(base, models, layer=TensorLayer(0, 3), inner="consensus", alpha=0.2, beta=0.6)


def test_inputs_unchanged():
    base, models = vectors()
    copies = [base.clone()] + [model.clone() for model in models]

    run_lines(base, models, layer=TensorLayer(1, 3), alpha=0.2, beta=0.6)

    for original, tensor in zip(copies, [base, *models]):
        assert torch.equal(original, tensor)


# Invariants


@pytest.mark.parametrize("index", [None, 0, 5, 11])
def test_beta_zero_equals_task_arithmetic(index, monkeypatch):
    """β = 0 is task arithmetic with λ = α, bit for bit, over several chunks and mixed dtypes."""
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 64)
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(10, 30, generator=generator).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(10, 30, generator=generator)).to(dtype)
              for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    model_params = [{"weight": weight, "density": 0.2} for weight in (1.0, 0.5, 2.0)]

    merged = run_lines(base, models, layer=TensorLayer(index, 12), model_params=model_params,
                       compute_dtype=torch.float32, alpha=0.37, beta=0.0)
    expected = task_arithmetic.operator(base, models, params={"lambda": 0.37, "normalize": False},
                                        model_params=model_params, seeds=(), compute_dtype=torch.float32)

    assert torch.equal(merged, expected)


@pytest.mark.parametrize("sign_election, normalize", [("trimmed", True), ("weighted", False)])
def test_beta_zero_equals_ties(sign_election, normalize, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 64)
    monkeypatch.setattr(sparsify, "_SEARCH_BLOCK", 8)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(12, 20, generator=generator)
    models = [base + 0.01 * torch.randn(12, 20, generator=generator) for _ in range(3)]
    model_params = [{"weight": weight, "density": density} for weight, density in ((1.0, 0.2), (0.5, 0.7), (2.0, 0.45))]
    shared = {"sign_election": sign_election, "normalize": normalize, "scope": "tensor"}

    merged = run_lines(base, models, layer=TensorLayer(7, 12), model_params=model_params,
                       compute_dtype=torch.float32, inner="ties", alpha=0.6, beta=0.0, **shared)
    expected = ties.operator(base, models, params={"lambda": 0.6, **shared}, model_params=model_params, seeds=(),
                             compute_dtype=torch.float32)

    assert torch.equal(merged, expected)


def test_task_arithmetic_alpha_is_one_over_t():
    """α and β unset for three unit-weight models: the first block gets exactly TA with λ = 1/3."""
    base, models = vectors()

    merged = run_lines(base, models, layer=TensorLayer(0, 12), beta=0.5)
    expected = task_arithmetic.operator(base, models, params={"lambda": 1 / 3, "normalize": False},
                                        model_params=lines_model_params(3), seeds=(), compute_dtype=torch.float64)

    assert torch.equal(merged, expected)


def test_unit_weight_task_arithmetic_needs_no_statistics():
    params = lines_params(beta=0.5)

    assert NormStatistics.for_targets([target("w", params, lines_model_params(3), 6)], torch.float32) is None


# α from the whole-model norms


def test_ties_alpha_from_norms():
    """α = (‖Σ τ‖₁ / ‖τ_MTL‖₁) / T with the untrimmed sum: (1.72 / 1.85) / 3."""
    base, models = vectors(torch.float32)
    params = lines_params(inner="ties", beta=0.5)
    model_params = lines_model_params(3, density=0.5)
    reducer = NormStatistics.for_targets([target("w", params, model_params, 6)], torch.float32)

    entries = gather(reducer, [("w", base, models, params, model_params)])

    assert reducer.max_passes == 3
    assert reducer.sum_norm == pytest.approx(1.72, rel=1e-6)
    assert reducer.merged_norm == pytest.approx(1.85, rel=1e-6)
    assert len({entry.alpha for entry in entries}) == 1
    assert entries[0].alpha == pytest.approx(1.72 / 1.85 / 3, rel=1e-6)
    merged = operator(base, models, params=params, model_params=model_params, seeds=(), statistics=entries,
                      layer=TensorLayer(None, 3))
    torch.testing.assert_close(merged, torch.tensor(BASE) + entries[0].alpha * torch.tensor(TIES_DIS_MEAN))


def test_alpha_norms_span_tensors():
    """The norms add over tensors: the six entries split into two tensors give the same α."""
    base, models = vectors()
    params = lines_params(inner="ties", scope="tensor", beta=0.5)
    model_params = lines_model_params(3, density=1.0)
    targets = [target(name, params, model_params, 3) for name in ("a", "b")]
    tensors = [(name, base[part], [model[part] for model in models], params, model_params)
               for name, part in (("a", slice(0, 3)), ("b", slice(3, 6)))]

    entries = gather(NormStatistics.for_targets(targets, torch.float64), tensors)

    # Density 1 with unit weights and dis-mean: τ_MTL is the mean of the agreeing entries.
    task_vectors = torch.tensor(TASK_VECTORS, dtype=torch.float64)
    signs = torch.sign(task_vectors.sum(0))
    agree = (torch.sign(task_vectors) == signs) & (task_vectors != 0)
    merged = (task_vectors * agree).sum(0) / agree.sum(0)
    expected = 1.72 / float(merged.abs().sum()) / 3
    assert entries[0].alpha == pytest.approx(expected, rel=1e-12)


def test_weighted_task_arithmetic_alpha():
    """Weights other than 1 make τ_MTL = Σ w τ, so α = ‖Σ τ‖₁ / ‖Σ w τ‖₁ / T."""
    base, models = vectors()
    params = lines_params(beta=0.5)
    model_params = [{"weight": weight, "density": 0.2} for weight in (1.0, 0.5, 2.0)]
    reducer = NormStatistics.for_targets([target("w", params, model_params, 6)], torch.float64)

    entries = gather(reducer, [("w", base, models, params, model_params)])

    task_vectors = torch.tensor(TASK_VECTORS, dtype=torch.float64)
    weighted = task_vectors[0] + 0.5 * task_vectors[1] + 2.0 * task_vectors[2]
    assert reducer.max_passes == 1
    assert entries[0].alpha == pytest.approx(1.72 / float(weighted.abs().sum()) / 3, rel=1e-12)


def test_uniform_weights_cancel_in_alpha():
    """All weights 0.5 halve τ_MTL and double α, so the first block equals the unit-weight merge.

    β is not rescaled, so deeper blocks differ: β applies to τ_MTL as it is.
    """
    base, models = vectors()
    params = lines_params(beta=0.5)
    model_params = lines_model_params(3, weight=0.5)
    entries = gather(NormStatistics.for_targets([target("w", params, model_params, 6)], torch.float64),
                     [("w", base, models, params, model_params)])

    merged = run_lines(base, models, layer=TensorLayer(0, 12), model_params=model_params, statistics=entries, beta=0.5)
    unit = run_lines(base, models, layer=TensorLayer(0, 12), beta=0.5)

    assert entries[0].alpha == pytest.approx(2 / 3, rel=1e-12)
    torch.testing.assert_close(merged, unit)


def test_zero_merged_vector_falls_back_to_one_over_t():
    base, models = vectors()
    params = lines_params(inner="ties", scope="tensor", beta=0.5)
    model_params = lines_model_params(3, density=0.0)

    entries = gather(NormStatistics.for_targets([target("w", params, model_params, 6)], torch.float64),
                     [("w", base, models, params, model_params)])

    assert entries[0].alpha == pytest.approx(1 / 3)


def test_given_alpha_runs_only_threshold_passes():
    params = lines_params(inner="ties", alpha=0.3, beta=0.5)
    reducer = NormStatistics.for_targets([target("w", params, lines_model_params(3, density=0.5), 6)], torch.float32)

    assert reducer.max_passes == 2
    assert "L1 norms" not in reducer.purpose


def test_operator_without_alpha_statistics_rejects_weights():
    base, models = vectors()
    model_params = [{"weight": weight, "density": 0.2} for weight in (1.0, 0.5, 2.0)]

    with pytest.raises(ValueError, match="needs α from the whole-model norms"):
        run_lines(base, models, layer=TensorLayer(0, 3), model_params=model_params, beta=0.5)


# Parameter checks


def test_check_rejects_consensus():
    problems = check_params(lines_params(inner="consensus", beta=0.5), lines_model_params(2))

    assert problems == ["`inner: consensus` is not implemented for lines yet; set `inner` to task_arithmetic or ties"]


def test_check_rejects_ties_settings_under_task_arithmetic():
    problems = check_params(lines_params(scope="tensor", beta=0.5), lines_model_params(2, density=0.5))

    assert len(problems) == 1
    assert "`scope`, `density` only apply with `inner: ties`" in problems[0]


def test_check_requires_beta_for_several_models():
    problems = check_params(lines_params(), lines_model_params(2))

    assert len(problems) == 1
    assert problems[0].startswith("`beta` is required when merging 2 models")


def test_check_accepts_single_model_without_beta():
    assert check_params(lines_params(), lines_model_params(1)) == []


def test_check_model_rejects_varying_alpha():
    model_params = lines_model_params(2)
    targets = [target("a", lines_params(alpha=0.2, beta=0.5), model_params, 4),
               target("b", lines_params(alpha=0.3, beta=0.5), model_params, 4)]

    problems = check_model(targets)

    assert len(problems) == 1
    assert problems[0].startswith("`alpha` varies by tensor (0.2 for a, 0.3 for b)")


def test_check_model_rejects_varying_density_with_model_scope():
    params = lines_params(inner="ties", beta=0.5)
    targets = [target("a", params, lines_model_params(2, density=0.2), 4),
               target("b", params, lines_model_params(2, density=0.4), 4)]

    problems = check_model(targets)

    assert len(problems) == 2
    assert all("varies by tensor" in problem for problem in problems)


def test_registered_as_layered():
    assert get_method("lines") is METHOD
    assert METHOD.layered
    assert METHOD.requires_base


def test_model_entry_holds_alpha_and_threshold():
    entry = ModelEntry(0.25, None)

    assert entry.alpha == 0.25
    assert entry.threshold is None
