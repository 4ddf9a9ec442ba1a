"""Tests of the TIES trim over the whole model: the threshold reducer, the operator with it, and the checks."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from whole_tensor_reference import assert_same_bits
from whole_tensor_reference import merge as reference_merge

from mergekit_plus.methods import chunks, sparsify
from mergekit_plus.methods.base import MergeTarget
from mergekit_plus.methods.ties import METHOD, ModelThreshold, TiesStatistics, TrimThresholds, WholeModelTies, check_model_scope
from reference_vectors import BASE, TASK_VECTORS

# The three task vectors of six entries of the TIES test vector. With k = 0.5, the rule
# |τ| ≥ (d − floor(k·d))-th smallest |τ| keeps four entries of each row:
#   τ̂₁ = [0.5, −0.2, 0.1, 0, 0.3, 0]
#   τ̂₂ = [−0.4, −0.3, 0, 0.2, 0, 0.1]
#   τ̂₃ = [0.3, 0.1, −0.6, 0, −0.1, 0]   (0.1 and −0.1 tie at the threshold, and both stay)
# Σ τ̂ = [0.4, −0.4, −0.5, 0.2, 0.2, 0.1] elects [+, −, −, +, +, +], and the mean of the agreeing
# entries (dis-mean) is [0.4, −0.25, −0.6, 0.2, 0.3, 0.1].
DIS_MEAN = [0.4, -0.25, -0.6, 0.2, 0.3, 0.1]
DIS_SUM = [0.8, -0.5, -0.6, 0.2, 0.3, 0.1]
# Three tensors of two entries each, so that the tied 0.1 and −0.1 of τ₃ fall into different tensors.
SPLIT = [(0, 2), (2, 4), (4, 6)]


def params(**overrides):
    return {p.name: p.default for p in METHOD.global_params} | overrides


def find_thresholds(pieces, densities, compute_dtype):
    """Run the threshold passes over `pieces` [(base, [model, ...]), ...] as the executor does."""
    numels = [sum(base.numel() for base, _ in pieces)] * len(densities)
    return run_passes(TrimThresholds(densities, numels, compute_dtype), pieces, densities)


def run_passes(reducer, pieces, densities):
    """Feed every piece to `reducer` pass after pass until it is done, and return its result."""
    passes = 0
    while not reducer.done:
        passes += 1
        for index, (base, models) in enumerate(pieces):
            reducer.update(f"tensor.{index}", base, models, models=range(len(models)), params=params(),
                           model_params=[{"weight": 1.0, "density": d} for d in densities])
        reducer.finish_pass()
    assert passes <= reducer.max_passes
    return reducer.result()


def merge_pieces(pieces, thresholds, weights, densities, compute_dtype, **overrides):
    merged = []
    for base, models in pieces:
        merged.append(METHOD.operator(
            base, models, params=params(**overrides),
            model_params=[{"weight": w, "density": d} for w, d in zip(weights, densities)],
            seeds=[0] * len(models), compute_dtype=compute_dtype, statistics=thresholds))
    return torch.cat([piece.reshape(-1) for piece in merged])


def split_reference_vector(dtype):
    base = torch.tensor(BASE, dtype=dtype)
    models = [base + torch.tensor(row, dtype=dtype) for row in TASK_VECTORS]
    return [(base[start:stop], [model[start:stop] for model in models]) for start, stop in SPLIT]


def sorted_threshold(deltas, density):
    """Return q, the (d − floor(density·d))-th smallest |τ|, and the count of |τ| ≥ q, by a sort.

    floor(density·d) is taken in exact decimal arithmetic, as `keep_count` rounds it.
    """
    flat = torch.cat([delta.reshape(-1) for delta in deltas]).abs()
    d = flat.numel()
    rank = d - math.floor(Fraction(str(density)) * d)
    q = torch.sort(flat).values[rank - 1]
    return q, int((flat >= q).sum())


def ties_statistics(pieces, densities, compute_dtype):
    """Run every statistics pass of a `scope: model` TIES merge over `pieces`, as the executor does."""
    numels = [sum(base.numel() for base, _ in pieces)] * len(densities)
    return run_passes(TiesStatistics(TrimThresholds(densities, numels, compute_dtype)), pieces, densities)


def test_zero_sum_takes_whole_model_majority():
    # Tensor 0: τ₁ = [1, 1], τ₂ = [−1, 0.5]; its first sum is 0 and its own elected signs are [0, +].
    # Tensor 1: τ₁ = τ₂ = [−1, −1, −1], elected [−, −, −]. Over the model the majority is −, so at
    # the zero sum only τ₂ = −1 agrees; the tensor's own majority (+) would keep τ₁ = 1 instead.
    zero = torch.zeros(2, dtype=torch.float64)
    pieces = [(zero, [torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 0.5], dtype=torch.float64)]),
              (torch.zeros(3, dtype=torch.float64), [torch.full((3,), -1.0, dtype=torch.float64)] * 2)]
    statistics = ties_statistics(pieces, [1.0, 1.0], torch.float64)

    assert isinstance(statistics, WholeModelTies)
    assert statistics.majority == -1
    merged = merge_pieces(pieces[:1], statistics, [1.0, 1.0], [1.0, 1.0], torch.float64)
    torch.testing.assert_close(merged, torch.tensor([-1.0, 0.75], dtype=torch.float64))
    per_tensor = merge_pieces(pieces[:1], statistics.thresholds, [1.0, 1.0], [1.0, 1.0], torch.float64)
    torch.testing.assert_close(per_tensor, torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_ties_statistics_select_models_keep_majority():
    statistics = ties_statistics(split_reference_vector(torch.float64), [0.5] * 3, torch.float64)
    selected = statistics.for_models([2, 0])
    assert selected.thresholds == (statistics.thresholds[2], statistics.thresholds[0])
    assert selected.majority == statistics.majority


# The TIES test vector


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_vector_split_dis_mean(dtype):
    pieces = split_reference_vector(dtype)
    thresholds = find_thresholds(pieces, [0.5] * 3, dtype)
    assert [threshold.kept_count for threshold in thresholds] == [4, 4, 4]
    assert [threshold.numel for threshold in thresholds] == [6, 6, 6]

    merged = merge_pieces(pieces, thresholds, [1.0] * 3, [0.5] * 3, dtype)
    expected = torch.tensor(BASE, dtype=dtype) + torch.tensor(DIS_MEAN, dtype=dtype)
    torch.testing.assert_close(merged, expected)


def test_reference_vector_split_dis_sum():
    pieces = split_reference_vector(torch.float64)
    thresholds = find_thresholds(pieces, [0.5] * 3, torch.float64)
    merged = merge_pieces(pieces, thresholds, [1.0] * 3, [0.5] * 3, torch.float64, normalize=False)
    expected = torch.tensor(BASE, dtype=torch.float64) + torch.tensor(DIS_SUM, dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


def test_tensor_scope_differs_on_split_vector():
    """Per tensor, density 0.5 keeps one entry of each two-entry piece, so the merge differs."""
    pieces = split_reference_vector(torch.float64)
    per_tensor = []
    for base, models in pieces:
        per_tensor.append(METHOD.operator(
            base, models, params=params(scope="tensor"),
            model_params=[{"weight": 1.0, "density": 0.5}] * 3, seeds=[0] * 3, compute_dtype=torch.float64))
    merged = torch.cat(per_tensor) - torch.tensor(BASE, dtype=torch.float64)
    # τ̂₁ keeps 0.5, 0.1, 0.3; τ̂₂ −0.4, 0.2, 0.1; τ̂₃ 0.3, −0.6, −0.1 (the first of each pair on a tie).
    expected = torch.tensor([0.4, 0.0, -0.6, 0.2, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


# The threshold against a sort over the whole model


def fine_tune_pieces(shapes, count, stored_dtype, seed):
    """A base and fine-tunes a few ulps away from it, split into tensors of `shapes`, so |τ| ties a lot."""
    generator = torch.Generator().manual_seed(seed)
    pieces = []
    for shape in shapes:
        base = torch.randn(shape, generator=generator) * 0.02
        models = [base + torch.randn(shape, generator=generator) * 2e-4 for _ in range(count)]
        pieces.append((base.to(stored_dtype), [model.to(stored_dtype) for model in models]))
    return pieces


@pytest.mark.parametrize(
    ("stored_dtype", "compute_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float32, torch.float64),
    ],
)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.013])
def test_threshold_matches_sort(monkeypatch, stored_dtype, compute_dtype, density):
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 64)
    pieces = fine_tune_pieces([(17, 9), (300,), (4, 4, 5), (1,)], 2, stored_dtype, seed=3)
    thresholds = find_thresholds(pieces, [density, 1 - density], compute_dtype)

    for index, density_of_model in enumerate([density, 1 - density]):
        deltas = [models[index].to(compute_dtype) - base.to(compute_dtype) for base, models in pieces]
        q, kept = sorted_threshold(deltas, density_of_model)
        threshold = thresholds[index]
        assert threshold.kept_count == kept
        assert threshold.minimum_key is not None
        flat = torch.cat([delta.reshape(-1) for delta in deltas])
        keys = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]) & (
            (1 << (8 * flat.element_size() - 1)) - 1)
        assert torch.equal(keys >= threshold.minimum_key, flat.abs() >= q)


def test_threshold_keeps_largest_below_one_entry():
    """floor(density·d) = 0 keeps the largest |τ| and its ties, as the reference code does."""
    base = torch.zeros(6)
    model = torch.tensor([0.1, -0.7, 0.7, 0.2, -0.3, 0.0])
    [threshold] = find_thresholds([(base[:3], [model[:3]]), (base[3:], [model[3:]])], [0.1], torch.float32)
    assert threshold.kept_count == 2


def test_threshold_density_edges():
    reducer = TrimThresholds([0.0, 1.0, 5 / 6, 0.5], [6, 6, 6, 0], torch.float32)
    # Density 0 keeps nothing; density 1 and floor(density·d) + 1 = d keep every entry; no entries, no pass.
    assert reducer.done
    assert reducer.max_passes == 0
    assert reducer.result() == (
        ModelThreshold(6, 0, None), ModelThreshold(6, 6, None), ModelThreshold(6, 6, None), ModelThreshold(0, 0, None),
    )


@pytest.mark.parametrize(("dtype", "passes"), [(torch.bfloat16, 1), (torch.float32, 2), (torch.float64, 4)])
def test_threshold_max_passes_by_dtype(dtype, passes):
    reducer = TrimThresholds([0.2], [100], dtype)
    assert reducer.max_passes == passes
    assert reducer.memory_bytes == sparsify.SELECTION_HISTOGRAM_BYTES


def test_threshold_rejects_wrong_entry_count():
    reducer = TrimThresholds([0.5], [10], torch.float32)
    reducer.update("t", torch.zeros(6), [torch.ones(6)], models=[0], params=params(), model_params=[{}])
    with pytest.raises(RuntimeError, match="saw 6 entries of the task vector of model 0, but the plan counts 10"):
        reducer.finish_pass()


def test_threshold_from_targets():
    targets = [
        MergeTarget("a", params(), ({"density": 0.2},), (10,)),
        MergeTarget("b", params(), ({"density": 0.2},), (30,)),
    ]
    reducer = TrimThresholds.for_targets(targets, torch.float32)
    assert reducer.numels == (40,)
    tensor_scope = [MergeTarget("a", params(scope="tensor"), ({"density": 0.2},), (10,))]
    assert TrimThresholds.for_targets(tensor_scope, torch.float32) is None


def test_thresholds_describe_kept_entries():
    pieces = split_reference_vector(torch.float32)
    reducer = TrimThresholds([0.5] * 3, [6] * 3, torch.float32)
    while not reducer.done:
        for base, models in pieces:
            reducer.update("t", base, models, models=range(3), params=params(), model_params=[{}] * 3)
        reducer.finish_pass()
    [first, *_] = reducer.describe()
    assert "keeps 4 of 6" in first
    # The stated bound may lie below q = 0.1 when no |τ| falls between the two.
    bound = float(re.search(r"\|τ\| ≥ ([0-9.e-]+)", first).group(1))
    assert 0.05 < bound <= 0.1


# The operator with whole-model thresholds


@pytest.mark.parametrize("normalize", [True, False])
def test_operator_matches_whole_tensor_reference(monkeypatch, normalize):
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 64)
    pieces = fine_tune_pieces([(37, 29), (50,)], 3, torch.bfloat16, seed=9)
    thresholds = find_thresholds(pieces, [0.2, 0.7, 0.45], torch.float32)
    model_params = [{"weight": w, "density": d} for w, d in zip([1.0, 0.5, 2.0], [0.2, 0.7, 0.45])]
    for base, models in pieces:
        arguments = dict(params=params(normalize=normalize), model_params=model_params, seeds=[0] * 3,
                         compute_dtype=torch.float32, statistics=thresholds)
        actual = METHOD.operator(base, models, **arguments)
        expected = reference_merge("ties", base, models, **arguments)
        assert_same_bits(actual, expected)


def test_operator_model_scope_needs_statistics():
    with pytest.raises(ValueError, match="scope `model` needs the whole-model trim thresholds"):
        METHOD.operator(torch.zeros(2), [torch.ones(2)], params=params(), model_params=[{"weight": 1.0, "density": 0.5}],
                        seeds=[0])


def test_operator_tensor_scope_rejects_statistics():
    with pytest.raises(ValueError, match="scope `tensor` takes no whole-model statistics"):
        METHOD.operator(torch.zeros(2), [torch.ones(2)], params=params(scope="tensor"),
                        model_params=[{"weight": 1.0, "density": 0.5}], seeds=[0],
                        statistics=(ModelThreshold(2, 2, None),))


def test_operator_needs_threshold_per_model():
    with pytest.raises(ValueError, match="one trim threshold per model: got 1 for 2 models"):
        METHOD.operator(torch.zeros(2), [torch.ones(2), torch.ones(2)], params=params(),
                        model_params=[{"weight": 1.0, "density": 0.5}] * 2, seeds=[0, 0],
                        statistics=(ModelThreshold(2, 2, None),))


def test_operator_threshold_keeps_none_or_all():
    base = torch.zeros(3)
    models = [torch.tensor([0.5, -0.2, 0.1]), torch.tensor([0.3, 0.4, -0.1])]
    thresholds = (ModelThreshold(3, 0, None), ModelThreshold(3, 3, None))
    merged = METHOD.operator(base, models, params=params(), model_params=[{"weight": 1.0, "density": 0.0},
                                                                          {"weight": 1.0, "density": 1.0}],
                             seeds=[0, 0], statistics=thresholds)
    assert torch.equal(merged, models[1])


# The whole-model check


def targets_with(densities_by_tensor, scopes=None):
    names = [f"model.layers.{index}.mlp.weight" for index in range(len(densities_by_tensor))]
    scopes = scopes or ["model"] * len(names)
    return [
        MergeTarget(name, params(scope=scope), tuple({"weight": 1.0, "density": d} for d in densities), (4,) * len(densities))
        for name, scope, densities in zip(names, scopes, densities_by_tensor)
    ]


def test_check_accepts_one_density_per_model():
    assert check_model_scope(targets_with([(0.2, 0.5), (0.2, 0.5)])) == []
    # A gradient of equal values interpolates to values that differ in the last bit.
    assert check_model_scope(targets_with([(0.2, 0.5), (0.2 * 0.3 + 0.2 * 0.7, 0.5)])) == []


def test_check_rejects_density_varying_by_tensor():
    [problem] = check_model_scope(targets_with([(0.2, 0.5), (0.2, 0.3)]))
    assert "`density` of models[1] varies by tensor" in problem
    assert "0.5 for model.layers.0.mlp.weight, 0.3 for model.layers.1.mlp.weight" in problem
    assert "set `scope: tensor`" in problem


def test_check_allows_varying_density_with_tensor_scope():
    assert check_model_scope(targets_with([(0.2,), (0.3,)], scopes=["tensor", "tensor"])) == []


def test_check_rejects_scope_varying_by_tensor():
    [problem] = check_model_scope(targets_with([(0.2,), (0.2,)], scopes=["model", "tensor"]))
    assert "`scope` varies by tensor (model for model.layers.0.mlp.weight, tensor for model.layers.1.mlp.weight)" in problem


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_thresholds_and_merge_on_cuda_match_cpu():
    pieces = fine_tune_pieces([(64, 48), (100,)], 2, torch.float32, seed=11)
    on_cuda = [(base.cuda(), [model.cuda() for model in models]) for base, models in pieces]
    cpu_thresholds = find_thresholds(pieces, [0.2, 0.4], torch.float32)
    cuda_thresholds = find_thresholds(on_cuda, [0.2, 0.4], torch.float32)
    assert cuda_thresholds == cpu_thresholds

    merged_cpu = merge_pieces(pieces, cpu_thresholds, [1.0, 0.5], [0.2, 0.4], torch.float32)
    merged_cuda = merge_pieces(on_cuda, cuda_thresholds, [1.0, 0.5], [0.2, 0.4], torch.float32)
    assert merged_cuda.device.type == "cuda"
    # GPU kernels may fuse a multiply and an add into one rounding, so the last bit may differ.
    torch.testing.assert_close(merged_cuda.cpu(), merged_cpu)
