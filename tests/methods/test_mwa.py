"""Tests of Metrics-Weighted Averaging: the weightings, the operator, folding an adapter, and the metrics read
from trainer state."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from mergekit_plus.errors import RecipeError
from mergekit_plus.methods.chunks import CHUNK_NUMEL
from mergekit_plus.methods.mwa import (
    METHOD,
    check,
    check_model,
    fold_config_problems,
    lora_modules,
    lora_scaling,
    metric_value_problems,
    mwa_weights,
    read_trainer_metric,
)
from mergekit_plus.methods.base import MergeTarget
from mergekit_plus.recipe.schema import Recipe

TENSORS = [
    torch.tensor([0.5, -0.2, 0.1, 0.0, 0.3, -0.05]),
    torch.tensor([-0.4, -0.3, 0.05, 0.2, 0.0, 0.1]),
    torch.tensor([0.3, 0.1, -0.6, 0.0, -0.1, 0.02]),
]


def model_params(metric: str, values) -> list[dict]:
    other = "step" if metric == "loss" else "loss"
    return [{metric: value, other: None} for value in values]


def params(metric: str = "loss", penalty: float = 1.0, weighting: str = "power", **extra) -> dict:
    """Return the global parameters as the planner resolves them, every default filled in."""
    return {"metric": metric, "penalty": penalty, "weighting": weighting, "fold": False, **extra}


def merge(tensors, metric, penalty, values, compute_dtype=torch.float32, weighting="power"):
    """Call the operator the way the planner does, with every parameter filled in."""
    return METHOD.operator(None, tensors, params=params(metric, penalty, weighting),
                           model_params=model_params(metric, values), seeds=[0] * len(tensors),
                           compute_dtype=compute_dtype)


def fold(base, factors, values, *, scaling, transposed=False, compute_dtype=torch.float32):
    """Call the operator on a fold job: the base weight, then every lora_A, then every lora_B."""
    return METHOD.operator(base, factors, params=params(fold=True, lora_scaling=scaling, lora_transposed=transposed),
                           model_params=model_params("loss", values), seeds=[0] * len(values),
                           compute_dtype=compute_dtype)


def write_trainer_state(folder: Path, state) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_mwa_declaration():
    assert METHOD.name == "mwa"
    assert METHOD.requires_base is False
    assert METHOD.param("metric").choices == ("loss", "step")
    assert METHOD.param("metric").default == "loss"
    assert METHOD.param("penalty").default == 1.0
    assert METHOD.param("weighting").choices == ("power", "exponential")
    assert METHOD.param("weighting").default == "power"
    assert METHOD.param("fold").default is False
    assert METHOD.param("loss").per_model
    assert METHOD.param("step").per_model


def test_penalty_zero_is_uniform_average():
    for metric, values in (("loss", [4.1, 1.8, 0.7]), ("step", [10, 20, 30])):
        merged = merge(TENSORS, metric, 0.0, values)
        torch.testing.assert_close(merged, torch.stack(TENSORS).mean(0), rtol=0, atol=1e-7)


def test_loss_weights_hand_computed():
    # p = 1: w ∝ 1/L = [1, 1/2, 1/4], normalised by 7/4.
    weights = mwa_weights("loss", 1.0, [1.0, 2.0, 4.0])
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7], abs=1e-15)


def test_step_weights_hand_computed():
    # p = 2: w ∝ s² = [100, 400, 900], normalised by 1400.
    weights = mwa_weights("step", 2.0, [10, 20, 30])
    assert weights == pytest.approx([1 / 14, 2 / 7, 9 / 14], abs=1e-15)


def test_fractional_penalty_hand_computed():
    # p = 0.5 on losses 1 and 4: w ∝ [1, 1/2].
    assert mwa_weights("loss", 0.5, [1.0, 4.0]) == pytest.approx([2 / 3, 1 / 3], abs=1e-15)


def test_operator_applies_weights():
    merged = merge(TENSORS, "loss", 1.0, [1.0, 2.0, 4.0])
    expected = (4 * TENSORS[0] + 2 * TENSORS[1] + TENSORS[2]) / 7
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-7)


def test_weights_sum_to_one():
    weights = mwa_weights("loss", 3.0, [0.9, 0.7, 0.65, 0.64])
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-15)
    assert weights == sorted(weights)


def test_exponential_weights_hand_computed():
    # p = 1 on losses 1 and 2: w ∝ [e⁻¹, e⁻²], normalised: [1, e⁻¹] / (1 + e⁻¹).
    weights = mwa_weights("loss", 1.0, [1.0, 2.0], weighting="exponential")
    assert weights == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))], abs=1e-15)


def test_exponential_weights_shift_invariant():
    # exp(−p·L) depends only on loss differences, so losses may be 0 or negative.
    shifted = mwa_weights("loss", 2.0, [-1.0, 0.0, 0.5], weighting="exponential")
    assert shifted == pytest.approx(mwa_weights("loss", 2.0, [9.0, 10.0, 10.5], weighting="exponential"), abs=1e-15)
    assert shifted[0] == pytest.approx(1 / (1 + math.exp(-2) + math.exp(-3)), abs=1e-15)


def test_exponential_operator_applies_weights():
    merged = merge(TENSORS[:2], "loss", math.log(3), [1.0, 2.0], weighting="exponential")
    # exp(−ln 3 · L) = [1/3, 1/9], normalised: [3/4, 1/4].
    torch.testing.assert_close(merged, 0.75 * TENSORS[0] + 0.25 * TENSORS[1], rtol=0, atol=1e-7)


def test_exponential_step_rejected():
    expected = r"`weighting: exponential` is defined for `metric: loss` only"
    with pytest.raises(ValueError, match=expected):
        mwa_weights("step", 1.0, [10, 20], weighting="exponential")
    assert re.match(expected, check(params("step", weighting="exponential"), model_params("step", [10, 20]))[0])


def test_large_penalty_selects_best_checkpoint():
    assert mwa_weights("loss", 1e4, [2.0, 0.5, 1.0]) == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)
    assert mwa_weights("step", 1e4, [10, 20, 30]) == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)


def test_step_zero_gets_no_weight():
    assert mwa_weights("step", 1.0, [0, 10, 30]) == pytest.approx([0.0, 0.25, 0.75], abs=1e-15)


def test_equal_metrics_give_uniform_weights():
    assert mwa_weights("loss", 5.0, [0.3, 0.3]) == pytest.approx([0.5, 0.5], abs=1e-15)


def test_operator_chunked_bfloat16_inputs():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(CHUNK_NUMEL + 7, generator=generator).to(torch.bfloat16) for _ in range(2)]
    merged = merge(tensors, "step", 1.0, [10, 30])
    expected = 0.25 * tensors[0].float() + 0.75 * tensors[1].float()
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_operator_keeps_inputs_unchanged():
    copies = [tensor.clone() for tensor in TENSORS]
    merge(TENSORS, "loss", 2.0, [1.0, 2.0, 3.0])
    for tensor, copy in zip(TENSORS, copies):
        assert torch.equal(tensor, copy)


@pytest.mark.parametrize(("metric", "values", "expected"), [
    ("loss", [1.0, 0.0], r"model 1: `loss` 0.0 is not above 0"),
    ("loss", [1.0, -2.0], r"model 1: `loss` -2.0 is not above 0"),
    ("loss", [float("nan"), 1.0], r"model 0: `loss` nan is not a finite number"),
    ("loss", [None, 1.0], r"model 0: no `loss` value"),
    ("step", [-1, 10], r"model 0: `step` -1 is negative"),
    ("step", [0, 0], r"every model has `step` 0"),
])
def test_invalid_metric_values(metric, values, expected):
    problems = metric_value_problems(metric, values)
    assert len(problems) == 1
    assert re.match(expected, problems[0])
    with pytest.raises(ValueError, match=expected):
        mwa_weights(metric, 1.0, values)


def test_check_rejects_unused_metric_value():
    values = [{"loss": 1.0, "step": 10}, {"loss": 2.0, "step": None}]
    problems = check(params("loss"), values)
    assert problems == ["`step` is set but `metric: loss` weights by loss; remove `step` or set `metric: step`"]


def test_check_accepts_valid_metrics():
    assert check(params("step"), model_params("step", [10, 20])) == []


def test_check_model_requires_one_weight_set():
    same = model_params("loss", [1.0, 2.0])
    other = model_params("loss", [1.0, 3.0])
    shared = params("loss")
    targets = [MergeTarget("a", shared, tuple(same), (1, 1)), MergeTarget("b", shared, tuple(same), (1, 1))]
    assert check_model(targets) == []
    targets.append(MergeTarget("c", shared, tuple(other), (1, 1)))
    assert len(check_model(targets)) == 1
    assert "tensor c differ from those of a" in check_model(targets)[0]


def test_trainer_state_step_and_last_loss(tmp_path):
    folder = write_trainer_state(tmp_path / "checkpoint-30", {
        "global_step": 30,
        "log_history": [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 1.5}, {"step": 20, "eval_loss": 9.0},
                        {"step": 30, "loss": 1.25}, {"step": 30, "train_runtime": 4.0}],
    })
    assert read_trainer_metric(folder, "step")[0] == 30
    assert read_trainer_metric(folder, "loss")[0] == 1.25


def test_trainer_state_missing_file(tmp_path):
    value, reason = read_trainer_metric(tmp_path, "loss")
    assert value is None
    assert reason == f"no trainer_state.json in {tmp_path}"


def test_trainer_state_without_loss(tmp_path):
    folder = write_trainer_state(tmp_path / "ckpt", {"global_step": 5, "log_history": [{"step": 5, "eval_loss": 1.0}]})
    value, reason = read_trainer_metric(folder, "loss")
    assert value is None
    assert "logs no training `loss`" in reason


def test_trainer_state_invalid_json(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    value, reason = read_trainer_metric(tmp_path, "step")
    assert value is None
    assert "cannot be read as JSON" in reason


def recipe_for(folders, parameters=None, model_parameters=None) -> Recipe:
    model_parameters = model_parameters or [{} for _ in folders]
    return Recipe(merge_method="mwa", parameters=parameters or {},
                  models=[{"model": str(folder), "parameters": own} for folder, own in zip(folders, model_parameters)])


def test_fill_reads_trainer_state(tmp_path):
    folders = [write_trainer_state(tmp_path / f"checkpoint-{step}",
                                   {"global_step": step, "log_history": [{"step": step, "loss": loss}]})
               for step, loss in ((10, 2.0), (20, 1.0))]
    recipe = recipe_for(folders, {"metric": "loss"})
    filled = METHOD.fill_model_parameters(recipe, [(i, str(f), f) for i, f in enumerate(folders)])
    assert [model.parameters for model in filled.models] == [{"loss": 2.0}, {"loss": 1.0}]
    assert [model.parameters for model in recipe.models] == [{}, {}]


def test_fill_prefers_recipe_values(tmp_path):
    folders = [write_trainer_state(tmp_path / f"checkpoint-{step}", {"global_step": step, "log_history": []})
               for step in (10, 20)]
    recipe = recipe_for(folders, {"metric": "step"}, [{"step": 7}, {}])
    filled = METHOD.fill_model_parameters(recipe, [(i, str(f), f) for i, f in enumerate(folders)])
    assert [model.parameters for model in filled.models] == [{"step": 7}, {"step": 20}]


def test_fill_names_every_model_without_metric(tmp_path):
    good = write_trainer_state(tmp_path / "good", {"global_step": 3, "log_history": [{"step": 3, "loss": 1.0}]})
    missing = tmp_path / "missing"
    missing.mkdir()
    negative = write_trainer_state(tmp_path / "negative", {"global_step": 3, "log_history": [{"loss": -1.0}]})
    folders = [good, missing, negative]
    recipe = recipe_for(folders, {"metric": "loss"})
    with pytest.raises(RecipeError) as caught:
        METHOD.fill_model_parameters(recipe, [(i, f.name, f) for i, f in enumerate(folders)])
    problems = caught.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("models[1] (missing): no `loss` in the recipe and no trainer_state.json in")
    assert problems[1].startswith("models[2] (negative): `loss` -1.0 is not above 0")


def test_fill_rejects_penalty_list(tmp_path):
    recipe = recipe_for([tmp_path], {"penalty": [0.0, 1.0]}, [{"loss": 1.0}])
    with pytest.raises(RecipeError, match=r"`penalty` takes one value"):
        METHOD.fill_model_parameters(recipe, [(0, "m", tmp_path)])


def test_fill_rejects_exponential_step(tmp_path):
    recipe = recipe_for([tmp_path], {"metric": "step", "weighting": "exponential"}, [{"step": 3}])
    with pytest.raises(RecipeError, match=r"`weighting: exponential` is defined for `metric: loss` only"):
        METHOD.fill_model_parameters(recipe, [(0, "m", tmp_path)])


def test_fill_rejects_fold_list(tmp_path):
    recipe = recipe_for([tmp_path], {"fold": [True, False]}, [{"loss": 1.0}])
    with pytest.raises(RecipeError, match=r"`fold` takes one value"):
        METHOD.fill_model_parameters(recipe, [(0, "m", tmp_path)])


# Folding: W + s·B̄Ā with Ā = Σ wᵢ Aᵢ and B̄ = Σ wᵢ Bᵢ. Losses 1 and 3 at p = 1 give w = [3/4, 1/4].
FOLD_BASE = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
FOLD_A = [torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1.0, 4.0, -2.0]])]  # Ā = [[1, 1, 1]]
FOLD_B = [torch.tensor([[2.0], [0.0]]), torch.tensor([[2.0], [4.0]])]  # B̄ = [[2], [1]]


def test_fold_hand_computed():
    # s·B̄Ā = 0.5 · [[2, 2, 2], [1, 1, 1]].
    folded = fold(FOLD_BASE, FOLD_A + FOLD_B, [1.0, 3.0], scaling=0.5)
    expected = torch.tensor([[1.0, 2.0, 3.0], [3.5, 4.5, 5.5]])
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-7)


def test_fold_transposed_weight():
    # Embeddings and Conv1D store W as (in, out), so the update is (B̄Ā)ᵀ.
    folded = fold(FOLD_BASE.T.contiguous(), FOLD_A + FOLD_B, [1.0, 3.0], scaling=0.5, transposed=True)
    expected = torch.tensor([[1.0, 2.0, 3.0], [3.5, 4.5, 5.5]]).T
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-7)


def test_fold_without_factors_converts_base():
    base = FOLD_BASE.to(torch.bfloat16)
    folded = fold(base, [], [1.0, 3.0], scaling=0.5)
    assert folded.dtype == torch.float32
    torch.testing.assert_close(folded, FOLD_BASE, rtol=0, atol=0)
    folded.add_(1.0)
    assert torch.equal(base, FOLD_BASE.to(torch.bfloat16))


def test_fold_keeps_inputs_unchanged():
    inputs = [FOLD_BASE, *FOLD_A, *FOLD_B]
    copies = [tensor.clone() for tensor in inputs]
    fold(FOLD_BASE, FOLD_A + FOLD_B, [1.0, 3.0], scaling=2.0)
    for tensor, copy in zip(inputs, copies):
        assert torch.equal(tensor, copy)


def test_fold_into_stored_base_layer():
    # peft loads the adapters' stored copies of a targeted embedding over the base's, so their
    # average replaces W: here 3/4 · W + 1/4 · 3W = 1.5 W.
    stored = [FOLD_BASE, 3 * FOLD_BASE]
    folded = fold(None, FOLD_A + FOLD_B + stored, [1.0, 3.0], scaling=0.5)
    expected = 1.5 * FOLD_BASE + torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-6)


def test_fold_rejects_unpaired_factors():
    with pytest.raises(ValueError, match=r"one lora_A and one lora_B factor per model: got 3 tensors for 2 models"):
        fold(FOLD_BASE, FOLD_A + FOLD_B[:1], [1.0, 3.0], scaling=1.0)


LORA_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": False, "rank_pattern": {},
               "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none", "use_dora": False,
               "init_lora_weights": True}


@pytest.mark.parametrize(("overrides", "module", "expected"), [
    ({}, "model.layers.0.self_attn.q_proj", (8, 2.0)),
    ({"use_rslora": True}, "model.layers.0.self_attn.q_proj", (8, 16 / math.sqrt(8))),
    ({"rank_pattern": {"q_proj": 4}}, "model.layers.0.self_attn.q_proj", (4, 4.0)),
    ({"rank_pattern": {"q_proj": 4}}, "model.layers.0.self_attn.k_proj", (8, 2.0)),
    # A pattern matches whole trailing name components: `proj` is no match for `q_proj`.
    ({"rank_pattern": {"proj": 4}}, "model.layers.0.self_attn.q_proj", (8, 2.0)),
    ({"alpha_pattern": {r"layers\.1\..*": 4}}, "model.layers.1.mlp.up_proj", (8, 0.5)),
    ({"rank_pattern": {"up_proj": 4}, "alpha_pattern": {"up_proj": 2}, "use_rslora": True},
     "model.layers.1.mlp.up_proj", (4, 1.0)),
])
def test_lora_scaling(overrides, module, expected):
    assert lora_scaling({**LORA_CONFIG, **overrides}, module) == pytest.approx(expected, abs=1e-15)


def test_lora_modules_groups_factors():
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
             "base_model.model.model.embed_tokens.lora_embedding_A",
             "base_model.model.model.embed_tokens.lora_embedding_B"]
    modules, problems = lora_modules(LORA_CONFIG, names)
    assert problems == []
    by_weight = {module.weight: module for module in modules}
    assert sorted(by_weight) == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert by_weight["model.layers.0.self_attn.q_proj.weight"].lora_a == names[0]
    assert by_weight["model.layers.0.self_attn.q_proj.weight"].transposed is False
    assert by_weight["model.embed_tokens.weight"].lora_b == names[3]
    assert by_weight["model.embed_tokens.weight"].transposed is True
    assert by_weight["model.embed_tokens.weight"].stored_weight is None
    stored, _ = lora_modules(LORA_CONFIG, [*names[2:], "base_model.model.model.embed_tokens.base_layer.weight"])
    assert stored[0].stored_weight == "base_model.model.model.embed_tokens.base_layer.weight"
    conv1d, _ = lora_modules({**LORA_CONFIG, "fan_in_fan_out": True}, names[:2])
    assert conv1d[0].transposed is True


def test_lora_modules_reports_other_tensors():
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
             "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    modules, problems = lora_modules(LORA_CONFIG, names)
    assert modules == []
    assert problems == [
        "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector is not a lora_A or lora_B "
        "factor of a linear or embedding layer",
        "module model.layers.0.self_attn.q_proj has no lora_B tensor",
        "module model.layers.0.self_attn.v_proj has no lora_A tensor",
    ]


def test_fold_config_accepts_plain_lora():
    assert fold_config_problems(LORA_CONFIG) == []
    assert fold_config_problems({**LORA_CONFIG, "init_lora_weights": "gaussian", "modules_to_save": None}) == []


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"use_dora": True}, "`use_dora: true` (DoRA magnitude vectors)"),
    ({"bias": "all"}, "`bias: all` (trained biases of the base layers)"),
    ({"modules_to_save": ["lm_head"]}, "`modules_to_save` is set (fully trained modules)"),
    ({"init_lora_weights": "pissa"}, "`init_lora_weights: pissa` may change the base weights"),
    ({"init_lora_weights": "pissa_niter_4"}, "`init_lora_weights: pissa_niter_4` may change the base weights"),
])
def test_fold_config_problems(overrides, expected):
    problems = fold_config_problems({**LORA_CONFIG, **overrides})
    assert len(problems) == 1
    assert problems[0].startswith(expected)
