"""Metrics-Weighted Averaging through `merge run`: LoRA checkpoints of the test zoo's run, and full checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from merge_helpers import invoke, load_and_generate, message_of, read_card, read_tensors, write_recipe
from safetensors.torch import load_file


def lora_checkpoints(zoo: Path) -> list[Path]:
    lora = json.loads((zoo / "zoo.json").read_text())["families"]["lm"]["lora"]
    return [zoo / checkpoint for checkpoint in lora["checkpoints"]]


def mwa_recipe(models, output: Path, parameters: dict, model_parameters=None) -> dict:
    model_parameters = model_parameters or [{} for _ in models]
    return {
        "merge_method": "mwa",
        "models": [{"model": model, "parameters": own} for model, own in zip(models, model_parameters)],
        "parameters": parameters,
        "output": {"path": output},
    }


def last_logged_loss(folder: Path) -> float:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry][-1]["loss"]


def weighted_average(tensor_sets: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    return {name: sum(weight * tensors[name].double() for tensors, weight in zip(tensor_sets, weights)).float()
            for name in tensor_sets[0]}


def test_mwa_lora_checkpoints_load_in_peft(test_zoo, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    checkpoints = lora_checkpoints(test_zoo)
    output = tmp_path / "mwa-loss"
    invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, output, {"metric": "loss", "penalty": 2.0}))],
           expected_exit=0)

    assert sorted(path.name for path in output.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "merge_recipe.yaml"]
    losses = [last_logged_loss(folder) for folder in checkpoints]
    inverse_squares = [loss ** -2 for loss in losses]
    weights = [value / sum(inverse_squares) for value in inverse_squares]
    expected = weighted_average([load_file(folder / "adapter_model.safetensors") for folder in checkpoints], weights)
    merged = load_file(output / "adapter_model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)

    base = AutoModelForCausalLM.from_pretrained(test_zoo / "lm" / "base")
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method that transformers 5 deprecates.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, output)
    with warnings.catch_warnings():
        # peft looks for the base's config relative to the working folder, not the adapter folder.
        warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
        loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6)

    config = json.loads((output / "adapter_config.json").read_text())
    assert (output / config["base_model_name_or_path"]).resolve() == (test_zoo / "lm" / "base").resolve()
    front, body = read_card(output)
    assert front["library_name"] == "peft"
    for weight, loss in zip(weights, losses):
        assert f"loss: {loss}" in body
        assert f"merge_weight: {round(weight, 8)}" in body


def test_mwa_lora_step_weights_logged(test_zoo, tmp_path):
    checkpoints = lora_checkpoints(test_zoo)
    output = tmp_path / "mwa-step"
    result = invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, output, {"metric": "step"}))],
                    expected_exit=0)
    steps = [json.loads((folder / "trainer_state.json").read_text())["global_step"] for folder in checkpoints]
    weights = [step / sum(steps) for step in steps]
    text = message_of(result)
    for folder, weight in zip(checkpoints, weights):
        assert f"mwa weight of {folder}: {weight:.6f} (step {steps[checkpoints.index(folder)]}, penalty 1)" in text
    expected = weighted_average([load_file(folder / "adapter_model.safetensors") for folder in checkpoints], weights)
    merged = load_file(output / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_mwa_full_checkpoints(llama_fine_tunes, tmp_path):
    output = tmp_path / "mwa-full"
    recipe = mwa_recipe(llama_fine_tunes, output, {"metric": "step", "penalty": 1.0}, [{"step": 10}, {"step": 30}])
    invoke(["run", write_recipe(tmp_path, recipe)], expected_exit=0)

    load_and_generate(output)
    inputs = [read_tensors(folder) for folder in llama_fine_tunes]
    merged = read_tensors(output)
    assert merged.keys() == inputs[0].keys()
    for name, tensor in weighted_average(inputs, [0.25, 0.75]).items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_mwa_missing_metric_names_model(llama_fine_tunes, tmp_path):
    output = tmp_path / "never"
    recipe = mwa_recipe(llama_fine_tunes, output, {"metric": "loss"}, [{"loss": 0.5}, {}])
    result = invoke(["run", write_recipe(tmp_path, recipe)], expected_exit=1)
    text = message_of(result)
    assert f"models[1] ({llama_fine_tunes[1]}): no `loss` in the recipe and no trainer_state.json in" in text
    assert "models[0]" not in text
    assert not output.exists()


def test_mwa_nonpositive_loss_rejected(llama_fine_tunes, tmp_path):
    recipe = mwa_recipe(llama_fine_tunes, tmp_path / "never", {}, [{"loss": 0.5}, {"loss": 0}])
    result = invoke(["run", write_recipe(tmp_path, recipe)], expected_exit=1)
    assert "models[1]" in message_of(result)
    assert "`loss` 0 is not above 0" in message_of(result)


@pytest.mark.parametrize("with_base", [False, True])
def test_mwa_adapter_input_mismatch(test_zoo, llama_fine_tunes, tmp_path, with_base):
    checkpoints = lora_checkpoints(test_zoo)
    if with_base:
        recipe = mwa_recipe(checkpoints[:2], tmp_path / "never", {"metric": "step"})
        recipe["base_model"] = test_zoo / "lm" / "base"
        expected = "the models are PEFT adapters, which `mwa` cannot merge with base_model"
    else:
        recipe = mwa_recipe([checkpoints[0], llama_fine_tunes[0]], tmp_path / "never", {"metric": "step"},
                            [{}, {"step": 5}])
        expected = "is a PEFT adapter but"
    result = invoke(["run", write_recipe(tmp_path, recipe)], expected_exit=2)
    assert expected in message_of(result)
    assert not (tmp_path / "never").exists()
