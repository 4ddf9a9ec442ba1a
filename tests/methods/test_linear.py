"""Tests of the linear (weighted average) merge."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods.linear import METHOD


def merge(tensors, weights, compute_dtype=None, **overrides):
    """Call the operator the way the planner does: every default filled in, `base` None.

    The compute dtype defaults to the inputs' dtype.
    """
    params = {p.name: p.default for p in METHOD.global_params} | overrides
    model_params = [{"weight": w} for w in weights]
    if compute_dtype is None:
        compute_dtype = tensors[0].dtype if tensors else torch.float32
    return METHOD.operator(
        None, tensors, params=params, model_params=model_params, seeds=[0] * len(tensors), compute_dtype=compute_dtype
    )


def test_linear_declaration():
    assert METHOD.name == "linear"
    assert METHOD.requires_base is False
    assert METHOD.aliases == ()
    assert METHOD.randomized is False
    assert METHOD.param("weight").per_model
    assert METHOD.param("weight").default == 1.0
    assert METHOD.param("normalize").default is True


def test_linear_hand_case_normalized():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    # (1·[1, 2] + 3·[3, 6]) / 4 = [10, 20] / 4
    torch.testing.assert_close(merge(tensors, [1.0, 3.0]), torch.tensor([2.5, 5.0]))


def test_linear_hand_case_plain_sum():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    merged = merge(tensors, [1.0, 3.0], normalize=False)
    torch.testing.assert_close(merged, torch.tensor([10.0, 20.0]))


def test_linear_default_weights_average():
    tensors = [torch.tensor([0.0, 4.0]), torch.tensor([2.0, 8.0]), torch.tensor([4.0, 0.0])]
    torch.testing.assert_close(merge(tensors, [1.0, 1.0, 1.0]), torch.tensor([2.0, 4.0]))


def test_linear_self_merge_normalized_returns_model():
    model = torch.tensor([0.3, -1.7, 2.5, 1e-3])
    merged = merge([model, model], [0.1, 1.0])
    torch.testing.assert_close(merged, model)


def test_linear_self_merge_plain_scales():
    model = torch.tensor([0.3, -1.7, 2.5, 1e-3])
    merged = merge([model, model], [0.1, 1.0], normalize=False)
    torch.testing.assert_close(merged, model * 1.1)


def test_linear_check_zero_weight_sum():
    problems = METHOD.check({"normalize": True}, [{"weight": 1.0}, {"weight": -1.0}])
    assert len(problems) == 1
    assert "the weights [1, -1] sum to 0" in problems[0]
    assert "set `normalize: false`" in problems[0]


def test_linear_check_rounding_counts_as_zero():
    problems = METHOD.check({"normalize": True}, [{"weight": 0.1}, {"weight": 0.2}, {"weight": -0.3}])
    assert len(problems) == 1


def test_linear_check_passes_without_normalize():
    assert METHOD.check({"normalize": False}, [{"weight": 1.0}, {"weight": -1.0}]) == []


def test_linear_check_passes_nonzero_sum():
    assert METHOD.check({"normalize": True}, [{"weight": 1.0}, {"weight": -0.5}]) == []


def test_linear_operator_rejects_zero_sum():
    tensors = [torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match=r"the weights \[1, -1\] sum to 0"):
        merge(tensors, [1.0, -1.0])


def test_linear_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"model 1 has shape \(3,\), expected \(2,\)"):
        merge([torch.ones(2), torch.ones(3)], [1.0, 1.0])


def test_linear_rejects_no_models():
    with pytest.raises(ValueError, match="at least one input tensor"):
        merge([], [])


def test_linear_bfloat16():
    tensors = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([3.0, 4.0], dtype=torch.bfloat16)]
    merged = merge(tensors, [1.0, 1.0])
    assert merged.dtype == torch.bfloat16
    assert merged.tolist() == [2.0, 3.0]


def test_linear_leaves_inputs():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    before = [t.clone() for t in tensors]
    merged = merge(tensors, [1.0, 1.0])
    for tensor, copy in zip(tensors, before):
        assert torch.equal(tensor, copy)
        assert merged.data_ptr() != tensor.data_ptr()
