"""Tests of task arithmetic."""

from __future__ import annotations

import pytest
import torch

from mergekit_plus.methods.task_arithmetic import METHOD


def merge(base, tensors, weights, compute_dtype=None, **overrides):
    """Call the operator the way the planner does, with every default filled in.

    The compute dtype defaults to the inputs' dtype.
    """
    params = {p.name: p.default for p in METHOD.global_params} | overrides
    model_params = [{"weight": w} for w in weights]
    if compute_dtype is None:
        compute_dtype = tensors[0].dtype
    return METHOD.operator(
        base, tensors, params=params, model_params=model_params, seeds=[0] * len(tensors), compute_dtype=compute_dtype
    )


def test_task_arithmetic_declaration():
    assert METHOD.requires_base is True
    assert METHOD.randomized is False
    assert METHOD.param("weight").default == 1.0
    assert METHOD.param("lambda").default == 1.0
    assert METHOD.param("normalize").default is False


def test_task_arithmetic_hand_case():
    base = torch.tensor([1.0, 1.0])
    tensors = [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])]
    # τ₁ = [1, −1], τ₂ = [0, 2]; Σ wτ = [1, −1] + 0.5·[0, 2] = [1, 0]; θ = [1, 1] + 2·[1, 0]
    merged = merge(base, tensors, [1.0, 0.5], **{"lambda": 2.0})
    torch.testing.assert_close(merged, torch.tensor([3.0, 1.0]))


def test_task_arithmetic_hand_case_normalized():
    base = torch.tensor([1.0, 1.0])
    tensors = [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])]
    # Σ wτ / Σ w = [1, 0] / 1.5; θ = [1, 1] + 2·[2/3, 0]
    merged = merge(base, tensors, [1.0, 0.5], normalize=True, **{"lambda": 2.0})
    torch.testing.assert_close(merged, torch.tensor([1.0 + 4.0 / 3.0, 1.0]))


def test_task_arithmetic_lambda_one_over_t_is_average():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    tensors = [torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    merged = merge(base, tensors, [1.0, 1.0, 1.0], **{"lambda": 1.0 / 3.0})
    torch.testing.assert_close(merged, torch.stack(tensors).mean(dim=0))


def test_task_arithmetic_lambda_zero_is_base():
    base = torch.tensor([0.5, -0.25])
    merged = merge(base, [torch.tensor([9.0, 9.0])], [1.0], **{"lambda": 0.0})
    assert torch.equal(merged, base)


def test_task_arithmetic_check_zero_weight_sum():
    problems = METHOD.check({"normalize": True, "lambda": 1.0}, [{"weight": 2.0}, {"weight": -2.0}])
    assert len(problems) == 1
    assert "sum to 0" in problems[0]
    assert METHOD.check({"normalize": False, "lambda": 1.0}, [{"weight": 2.0}, {"weight": -2.0}]) == []


def test_task_arithmetic_operator_rejects_zero_sum():
    base = torch.zeros(2)
    with pytest.raises(ValueError, match=r"the weights \[2, -2\] sum to 0"):
        merge(base, [torch.ones(2), torch.ones(2)], [2.0, -2.0], normalize=True)


def test_task_arithmetic_requires_base():
    with pytest.raises(ValueError, match="needs a base model tensor"):
        merge(None, [torch.ones(2)], [1.0])


def test_task_arithmetic_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"model 0 has shape \(3,\), expected \(2,\)"):
        merge(torch.zeros(2), [torch.ones(3)], [1.0])


def test_task_arithmetic_bfloat16():
    base = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    tensors = [torch.tensor([2.0, 2.0], dtype=torch.bfloat16), torch.tensor([1.0, 4.0], dtype=torch.bfloat16)]
    merged = merge(base, tensors, [1.0, 1.0])
    assert merged.dtype == torch.bfloat16
    assert merged.tolist() == [2.0, 4.0]


def test_task_arithmetic_leaves_inputs():
    base = torch.tensor([1.0, 2.0])
    tensors = [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])]
    copies = [base.clone(), *(t.clone() for t in tensors)]
    merged = merge(base, tensors, [1.0, 1.0])
    for tensor, copy in zip([base, *tensors], copies):
        assert torch.equal(tensor, copy)
        assert merged.data_ptr() != tensor.data_ptr()
