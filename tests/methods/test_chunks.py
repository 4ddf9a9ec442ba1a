"""Tests of the chunked inputs, and of every operator against its whole-tensor reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from whole_tensor_reference import assert_same_bits
from whole_tensor_reference import merge as reference_merge

from mergekit_plus.methods import chunks, get_method, sparsify
from mergekit_plus.methods.chunks import ChunkScratch, TaskVectors, chunk_bounds

METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")

# The whole-tensor references trim per tensor, so TIES runs with `scope: tensor` here. Its
# whole-model trim has tests of its own.
PER_TENSOR = {"ties": {"scope": "tensor"}}


def default_params(method_name):
    """Return the method's global parameters with every default filled in, per-tensor scope for TIES."""
    method = get_method(method_name)
    return {p.name: p.default for p in method.global_params} | PER_TENSOR.get(method_name, {})


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 entries and tie searches in blocks of 8, so small tensors span many of both."""
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 64)
    monkeypatch.setattr(sparsify, "_SEARCH_BLOCK", 8)


def models_like_fine_tunes(shape, count, stored_dtype, seed=0):
    """A base and fine-tunes a few bfloat16 steps away from it, so task vectors tie a lot."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    models = [base + torch.randn(shape, generator=generator) * 2e-4 for _ in range(count)]
    return base.to(stored_dtype), [model.to(stored_dtype) for model in models]


def models_with_cancellations(shape, stored_dtype, seed=0):
    """Models whose task vectors cancel at many coordinates and are mostly negative elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    step = torch.randint(-2, 3, shape, generator=generator).double() * 0.25
    drift = -torch.rand(shape, generator=generator).double() * (torch.rand(shape, generator=generator) < 0.3)
    models = [base + step, base - step, base + drift]
    return base.to(stored_dtype), [model.to(stored_dtype) for model in models]


def run(method_name, base, models, compute_dtype, **overrides):
    """Return the package operator's merge and the reference merge, for the same parameters."""
    method = get_method(method_name)
    params = default_params(method_name) | overrides
    model_params = [
        {"weight": weight, "density": density}
        for weight, density in zip([1.0, 0.5, 2.0], [0.2, 0.7, 0.45])
    ][: len(models)]
    seeds = [101, 202, 303][: len(models)]
    base_input = base if method.requires_base else None
    actual = method.operator(
        base_input, models, params=params, model_params=model_params, seeds=seeds, compute_dtype=compute_dtype
    )
    expected = reference_merge(
        method_name,
        base_input,
        models,
        params=params,
        model_params=model_params,
        seeds=seeds,
        compute_dtype=compute_dtype,
    )
    return actual, expected


# chunk_bounds, ChunkScratch and TaskVectors


def test_chunk_bounds_cover_tensor(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_NUMEL", 4)
    assert list(chunk_bounds(10)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_bounds(8)) == [(0, 4), (4, 8)]
    assert list(chunk_bounds(0)) == []


def test_scratch_reuses_buffers():
    scratch = ChunkScratch(100, torch.device("cpu"))
    first = scratch.get("keys", torch.int32, 100)
    again = scratch.get("keys", torch.int32, 60)
    assert again.data_ptr() == first.data_ptr()
    assert again.numel() == 60
    other_dtype = scratch.get("keys", torch.float32, 100)
    assert other_dtype.data_ptr() != first.data_ptr()


def test_scratch_grows_for_larger_request():
    scratch = ChunkScratch(10, torch.device("cpu"))
    assert scratch.get("codes", torch.int32, 25).numel() == 25


@pytest.mark.parametrize(
    ("stored_dtype", "compute_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
    ],
)
def test_task_vectors_match_whole_difference(small_chunks, stored_dtype, compute_dtype):
    base, models = models_like_fine_tunes((13, 11), 2, stored_dtype)
    inputs = TaskVectors(base, models, compute_dtype)
    expected = [model.to(compute_dtype) - base.to(compute_dtype) for model in models]

    starts = []
    for chunk in inputs.chunks():
        starts.append(chunk.start)
        assert_same_bits(chunk.base, base.to(compute_dtype).reshape(-1)[chunk.start : chunk.stop])
        for delta, whole in zip(chunk.deltas, expected):
            assert_same_bits(delta, whole.reshape(-1)[chunk.start : chunk.stop])
    assert starts == [0, 64, 128]


def test_task_vectors_subset_of_models(small_chunks):
    base, models = models_like_fine_tunes((100,), 3, torch.float32)
    inputs = TaskVectors(base, models, torch.float32)
    for chunk in inputs.chunks([2]):
        assert len(chunk.deltas) == 1
        assert torch.equal(chunk.deltas[0], (models[2] - base)[chunk.start : chunk.stop])


def test_task_vectors_non_contiguous_inputs(small_chunks):
    base, models = models_like_fine_tunes((20, 15), 1, torch.float32)
    transposed = TaskVectors(base.t(), [models[0].t()], torch.float32)
    pieces = [chunk.deltas[0].clone() for chunk in transposed.chunks()]
    assert torch.equal(torch.cat(pieces), (models[0].t() - base.t()).reshape(-1))


# every operator against the whole-tensor reference


@pytest.mark.parametrize("method_name", METHOD_NAMES)
@pytest.mark.parametrize(
    ("stored_dtype", "compute_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float64),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float16),
    ],
)
def test_operator_matches_reference(small_chunks, method_name, stored_dtype, compute_dtype):
    base, models = models_like_fine_tunes((37, 29), 3, stored_dtype)
    actual, expected = run(method_name, base, models, compute_dtype)
    assert actual.dtype == compute_dtype
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("method_name", METHOD_NAMES)
@pytest.mark.parametrize("normalize", [True, False])
def test_operator_matches_reference_with_cancellations(small_chunks, method_name, normalize):
    base, models = models_with_cancellations((41, 23), torch.float32)
    overrides = {"normalize": normalize} | ({"lambda": 0.75} if method_name != "linear" else {})
    actual, expected = run(method_name, base, models, torch.float32, **overrides)
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("method_name", ["ties", "dare_ties"])
def test_weighted_election_matches_reference(small_chunks, method_name):
    base, models = models_with_cancellations((30, 30), torch.bfloat16, seed=4)
    actual, expected = run(method_name, base, models, torch.float32, sign_election="weighted")
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_operator_default_chunks_match_reference(method_name):
    # One real chunk and a partial second one, with the chunk size the package ships with.
    base, models = models_like_fine_tunes((chunks.CHUNK_NUMEL + 1000,), 3, torch.bfloat16, seed=5)
    actual, expected = run(method_name, base, models, torch.float32)
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_operator_mixed_stored_dtypes(small_chunks, method_name):
    base, models = models_like_fine_tunes((300,), 3, torch.bfloat16, seed=6)
    models = [models[0].to(torch.float16), models[1], models[2].to(torch.float32)]
    actual, expected = run(method_name, base, models, torch.float32)
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_operator_leaves_stored_inputs(small_chunks, method_name):
    base, models = models_like_fine_tunes((200,), 3, torch.float32, seed=7)
    copies = [base.clone(), *(model.clone() for model in models)]
    merged, _ = run(method_name, base, models, torch.float32)
    for tensor, copy in zip([base, *models], copies):
        assert torch.equal(tensor, copy)
        assert merged.data_ptr() != tensor.data_ptr()


@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_operator_default_compute_dtype_is_float32(method_name):
    method = get_method(method_name)
    base, models = models_like_fine_tunes((50,), 2, torch.bfloat16, seed=8)
    params = default_params(method_name)
    model_params = [{p.name: p.default for p in method.model_params}] * 2
    base_input = base if method.requires_base else None
    merged = method.operator(base_input, models, params=params, model_params=model_params, seeds=[1, 2])
    converted = method.operator(
        base_input.float() if base_input is not None else None,
        [model.float() for model in models],
        params=params,
        model_params=model_params,
        seeds=[1, 2],
        compute_dtype=torch.float32,
    )
    assert merged.dtype == torch.float32
    assert_same_bits(merged, converted)
