"""Per-tensor parameter resolution: precedence, filters, gradients."""

from __future__ import annotations

import pytest

from mergekit_plus.architecture import layer_position
from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.recipe.params import (
    LayerPosition,
    evaluate_value,
    filter_matches,
    interpolate_gradient,
    resolve_tensor_parameters,
)

METHOD = MergeMethod(
    name="probe", title="Probe", paper="-", summary="-", requires_base=False, operator=lambda *a, **k: None,
    params=(
        Param("scale", float, 1.0, "global"),
        Param("weight", float, 1.0, "per model", per_model=True),
    ),
)


def test_gradient_interpolates_over_layers():
    assert interpolate_gradient([0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert interpolate_gradient([0.0, 1.0, 0.0], 0.5) == pytest.approx(1.0)
    assert interpolate_gradient([0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    assert interpolate_gradient([2.0], 0.3) == 2.0


def test_layer_positions():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 4).fraction == 0.0
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4).fraction == 1.0
    assert layer_position("model.embed_tokens.weight", 4).fraction == 0.0
    assert layer_position("model.norm.weight", 4).fraction == 1.0
    assert layer_position("lm_head.weight", 4).fraction == 1.0


def test_filters_substring_and_glob():
    assert filter_matches("self_attn", "model.layers.0.self_attn.q_proj.weight")
    assert not filter_matches("mlp", "model.layers.0.self_attn.q_proj.weight")
    assert filter_matches("*.layers.1.*", "model.layers.1.mlp.up_proj.weight")
    assert not filter_matches("*.layers.1.*", "model.layers.11.mlp.up_proj.weight")


def test_first_matching_filter_wins():
    value = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "layers", "value": 0.3}, {"value": 0.9}]
    middle = LayerPosition(0.5)
    assert evaluate_value(value, "model.layers.1.mlp.up_proj.weight", middle) == pytest.approx(0.5)
    assert evaluate_value(value, "model.layers.1.self_attn.q_proj.weight", middle) == 0.3
    assert evaluate_value(value, "model.embed_tokens.weight", middle) == 0.9


def test_precedence_model_then_global_then_default():
    params, per_model = resolve_tensor_parameters(
        METHOD,
        {"weight": 0.5},
        [{"weight": 2.0}, {}, {"weight": [{"filter": "mlp", "value": 3.0}]}],
        "model.layers.0.self_attn.q_proj.weight",
        LayerPosition(0.0),
    )
    assert params == {"scale": 1.0}
    # The third model's filter list does not match, so the global value applies.
    assert [p["weight"] for p in per_model] == [2.0, 0.5, 0.5]


def test_integer_values_become_floats():
    params, _ = resolve_tensor_parameters(METHOD, {"scale": 2}, [], "x", LayerPosition(0.0))
    assert params["scale"] == 2.0
    assert isinstance(params["scale"], float)
