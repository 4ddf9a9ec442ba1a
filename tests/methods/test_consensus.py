"""Tests of Consensus Merging: the operator, its whole-model mask census and its checks."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods import chunks, get_method
from mergekit_plus.methods.base import MergeTarget
from mergekit_plus.methods.consensus import METHOD, MaskCensus, check_consensus_model
from reference_vectors import BASE, TASK_VECTORS

# Three task vectors of six entries. With λ_t = 0.4 their TALL masks against τ_MTL = Σ τ_t keep
# [1,1,0,0,1,1], [1,1,0,1,0,1] and [1,0,1,0,0,0], so the mask counts are [3,2,1,1,1,2]. With k = 2
# the consensus keeps indices 0, 1 and 5: τ_cons = [0.4, −0.4, 0, 0, 0, 0.07].
CONSENSUS_TA = [0.4, -0.4, 0.0, 0.0, 0.0, 0.07]
# With `inner: ties` at density 0.5 over the whole model, τ_MTL is the TIES dis-sum
# [0.8, −0.5, −0.6, 0.2, 0.3, 0.1]. At λ_t = 0.4 the masks are [1,1,0,0,1,0], [0,1,0,1,0,1] and
# [1,0,1,0,0,0], the counts [2,2,1,1,1,1], and the consensus keeps indices 0 and 1.
CONSENSUS_TIES = [0.8, -0.5, 0.0, 0.0, 0.0, 0.0]


def params(**overrides):
    return {p.name: p.default for p in METHOD.global_params} | overrides


def model_params(count=3, **overrides):
    return [{p.name: p.default for p in METHOD.model_params} | overrides for _ in range(count)]


def models_from(task_vectors, dtype=torch.float64):
    base = torch.tensor(BASE, dtype=dtype)
    return base, [base + torch.tensor(row, dtype=dtype) for row in task_vectors]


def merge(base, models, *, statistics=None, compute_dtype=torch.float64, mask_lambda=0.4, density=0.2, **overrides):
    return METHOD.operator(base, models, params=params(**overrides),
                           model_params=model_params(len(models), mask_lambda=mask_lambda, density=density),
                           seeds=[0] * len(models), compute_dtype=compute_dtype, statistics=statistics)


def run_census(pieces, *, density=0.2, compute_dtype=torch.float64, **overrides):
    """Run the statistics passes over `pieces` [(base, [model, ...]), ...] as the executor does."""
    targets = [MergeTarget(f"tensor.{index}", params(**overrides), tuple(model_params(len(models), density=density)),
                           (base.numel(),) * len(models))
               for index, (base, models) in enumerate(pieces)]
    census = MaskCensus.for_targets(targets, compute_dtype)
    passes = 0
    while not census.done:
        passes += 1
        for target, (base, models) in zip(targets, pieces):
            census.update(target.name, base, models, models=range(len(models)), params=target.params,
                          model_params=target.model_params)
        census.finish_pass()
    assert passes <= census.max_passes
    return census


def test_consensus_declaration():
    assert get_method("consensus") is METHOD
    assert METHOD.requires_base is True
    assert METHOD.randomized is False
    assert METHOD.param("k").default == 2
    assert METHOD.param("k").kind is int
    assert METHOD.param("mask_lambda").per_model
    assert METHOD.param("mask_lambda").default == 0.4
    assert METHOD.param("inner").default == "task_arithmetic"
    assert METHOD.param("normalize").default is False
    assert METHOD.param("lambda").default == 1.0


def test_consensus_ta_hand_computed():
    base, models = models_from(TASK_VECTORS)

    merged = merge(base, models)

    torch.testing.assert_close(merged, base + torch.tensor(CONSENSUS_TA, dtype=torch.float64))


def test_consensus_ties_hand_computed():
    base, models = models_from(TASK_VECTORS)
    census = run_census([(base, models)], density=0.5, inner="ties")

    merged = merge(base, models, statistics=census.result(), density=0.5, inner="ties")

    torch.testing.assert_close(merged, base + torch.tensor(CONSENSUS_TIES, dtype=torch.float64))


def test_lambda_scales_consensus_vector():
    base, models = models_from(TASK_VECTORS)

    merged = merge(base, models, **{"lambda": 0.5})

    torch.testing.assert_close(merged, base + 0.5 * torch.tensor(CONSENSUS_TA, dtype=torch.float64))


def test_k_zero_equals_task_arithmetic():
    base, models = models_from(TASK_VECTORS, dtype=torch.float32)
    task_arithmetic = get_method("task_arithmetic")

    merged = merge(base, models, compute_dtype=torch.float32, k=0, **{"lambda": 0.7})
    expected = task_arithmetic.operator(base, models, params={"lambda": 0.7, "normalize": False},
                                        model_params=[{"weight": 1.0}] * 3, seeds=[0] * 3,
                                        compute_dtype=torch.float32)

    assert torch.equal(merged, expected)


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_k_zero_equals_ties_dis_sum(scope):
    base, models = models_from(TASK_VECTORS, dtype=torch.float32)
    ties = get_method("ties")
    ties_params = {"lambda": 0.7, "normalize": False, "sign_election": "trimmed", "scope": scope}
    census = run_census([(base, models)], density=0.5, compute_dtype=torch.float32, inner="ties", scope=scope)
    thresholds = census.result() if scope == "model" else None

    merged = merge(base, models, statistics=thresholds, compute_dtype=torch.float32, density=0.5, k=0,
                   inner="ties", scope=scope, **{"lambda": 0.7})
    expected = ties.operator(base, models, params=ties_params, model_params=[{"weight": 1.0, "density": 0.5}] * 3,
                             seeds=[0] * 3, compute_dtype=torch.float32, statistics=thresholds)

    assert torch.equal(merged, expected)


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
def test_k_above_task_count_returns_base(inner):
    base, models = models_from(TASK_VECTORS, dtype=torch.float32)

    merged = merge(base, models, compute_dtype=torch.float32, k=4, inner=inner, scope="tensor")

    assert torch.equal(merged, base)


def test_chunking_does_not_change_result(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(37, 11, generator=generator)
    models = [base + 0.1 * torch.randn(37, 11, generator=generator) for _ in range(3)]
    whole = merge(base, models, compute_dtype=torch.float32)

    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 64)
    chunked = merge(base, models, compute_dtype=torch.float32)

    assert torch.equal(chunked, whole)


def test_inputs_not_modified():
    base, models = models_from(TASK_VECTORS, dtype=torch.float32)
    copies = [base.clone()] + [model.clone() for model in models]

    merge(base, models, compute_dtype=torch.float32, inner="ties", scope="tensor")

    for original, copy in zip([base, *models], copies):
        assert torch.equal(original, copy)


def test_bfloat16_inputs_float32_result():
    base, models = models_from(TASK_VECTORS, dtype=torch.bfloat16)

    merged = merge(base, models, compute_dtype=torch.float32)

    assert merged.dtype == torch.float32
    assert merged.shape == base.shape


def test_census_counts_selfish_and_catastrophic():
    """Counts [3,2,1,1,1,2]: no catastrophic entry, three selfish ones (one per task), three kept at k = 2."""
    base, models = models_from(TASK_VECTORS)
    # Two tensors, so that the census sums over the whole model.
    pieces = [(base[:4], [model[:4] for model in models]), (base[4:], [model[4:] for model in models])]

    census = run_census(pieces)

    assert census.entries == 6
    assert census.by_mask_count == [0, 3, 2, 1]
    assert census.mask_sizes == [4, 4, 2]
    assert census.selfish == [1, 1, 1]
    assert census.fractions() == {"catastrophic": 0.0, "selfish": 0.5, "kept": 0.5}
    assert census.result() == (None, None, None)


def test_census_summary_reports_fractions():
    base, models = models_from(TASK_VECTORS)

    census = run_census([(base, models)])

    assert "0.00% are catastrophic" in census.summary()
    assert "50.00% selfish" in census.summary()
    assert len(census.describe()) == 3


def test_census_ties_model_scope_passes():
    base, models = models_from(TASK_VECTORS, dtype=torch.float32)

    census = run_census([(base, models)], density=0.5, compute_dtype=torch.float32, inner="ties")

    assert census.max_passes >= 2
    assert [threshold.kept_count for threshold in census.result()] == [4, 4, 4]
    assert census.by_mask_count == [0, 4, 2, 0]


def test_census_result_before_passes_rejected():
    target = MergeTarget("tensor", params(), tuple(model_params()), (6, 6, 6))
    census = MaskCensus.for_targets([target], torch.float64)

    with pytest.raises(RuntimeError, match="not complete"):
        census.result()


def test_inner_varying_by_tensor_rejected():
    targets = [MergeTarget("a", params(), tuple(model_params()), (6,) * 3),
               MergeTarget("b", params(inner="ties"), tuple(model_params()), (6,) * 3)]

    problems = check_consensus_model(targets)

    assert len(problems) == 1
    assert "`inner` varies by tensor" in problems[0]


def test_ties_density_varying_in_model_scope_rejected():
    targets = [MergeTarget("a", params(inner="ties"), tuple(model_params(density=0.2)), (6,) * 3),
               MergeTarget("b", params(inner="ties"), tuple(model_params(density=0.5)), (6,) * 3)]

    problems = check_consensus_model(targets)

    assert any("`density` of models[0] varies by tensor" in problem for problem in problems)


def test_missing_base_rejected():
    _, models = models_from(TASK_VECTORS)

    with pytest.raises(ValueError, match="consensus needs a base model tensor"):
        merge(None, models)
