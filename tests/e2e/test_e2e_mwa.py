"""Metrics-Weighted Averaging through `merge run`: LoRA checkpoints of the test zoo's run, folded into their
base or not, LoRA runs of tiny models written by peft, and full checkpoints."""

from __future__ import annotations

import contextlib
import json
import shutil
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
        assert (f"mwa weight of {folder}: {weight:.6f} (step {steps[checkpoints.index(folder)]}, power weighting, "
                "penalty 1)") in text
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


@contextlib.contextmanager
def peft_quietly():
    """Silence the warnings that peft 0.21 raises with transformers 5, which a test cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        yield


def merged_in_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Return the state dict of `base` with `adapter` merged in by peft's `merge_and_unload`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with peft_quietly():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return model.state_dict()


def assert_matches_peft(folded: Path, base: Path, adapter: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folded, output_loading_info=True)
    assert list(info["missing_keys"]) == []
    assert list(info["unexpected_keys"]) == []
    expected = merged_in_peft(base, adapter)
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6, msg=f"tensor {name}")


def test_mwa_fold_zoo_run_matches_peft(test_zoo, tmp_path):
    checkpoints = lora_checkpoints(test_zoo)
    adapter, folded = tmp_path / "mwa-adapter", tmp_path / "mwa-folded"
    parameters = {"metric": "loss", "penalty": 2.0}
    invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, adapter, parameters), name="adapter.yaml")],
           expected_exit=0)
    invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, folded, {**parameters, "fold": True}),
                                name="folded.yaml")], expected_exit=0)

    base = test_zoo / "lm" / "base"
    load_and_generate(folded)
    assert_matches_peft(folded, base, adapter)
    assert (folded / "config.json").is_file()
    assert not (folded / "adapter_config.json").exists()
    front, body = read_card(folded)
    assert front["library_name"] == "transformers"
    assert str(base.resolve()) in body
    assert "fold: true" in body


def test_mwa_fold_into_recipe_base(test_zoo, tmp_path):
    checkpoints = lora_checkpoints(test_zoo)
    from_config, from_recipe = tmp_path / "from-config", tmp_path / "from-recipe"
    parameters = {"metric": "step", "fold": True}
    invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, from_config, parameters), name="config.yaml")],
           expected_exit=0)
    recipe = mwa_recipe(checkpoints, from_recipe, parameters)
    recipe["base_model"] = test_zoo / "lm" / "base"
    invoke(["run", write_recipe(tmp_path, recipe, name="recipe.yaml")], expected_exit=0)
    assert (from_recipe / "model.safetensors").read_bytes() == (from_config / "model.safetensors").read_bytes()


def write_lora_run(base: Path, folder: Path, architecture: str, steps: tuple[int, ...]) -> list[Path]:
    """Save one randomly initialised LoRA adapter of `base` per step, each with a trainer_state.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if architecture == "llama":
        # rsLoRA, rank and alpha patterns, and an embedding adapter, which peft stores transposed.
        config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2},
                            alpha_pattern={"down_proj": 3}, init_lora_weights=False,
                            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    else:
        # GPT-2's Conv1D layers store their weight as (in, out), so peft sets fan_in_fan_out.
        config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["c_attn", "c_fc"])
    checkpoints = []
    for step in steps:
        torch.manual_seed(step)
        checkpoint = folder / f"checkpoint-{step}"
        with peft_quietly():
            get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(checkpoint)
        state = {"global_step": step, "log_history": [{"step": step, "loss": 1.0 / step}]}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        checkpoints.append(checkpoint)
    return checkpoints


def tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_mwa_fold_matches_peft(llama_base, tmp_path, architecture):
    base = llama_base if architecture == "llama" else tiny_gpt2(tmp_path / "gpt2-base")
    checkpoints = write_lora_run(base, tmp_path / "run", architecture, steps=(10, 20, 30))
    config = json.loads((checkpoints[0] / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (architecture == "gpt2")

    adapter, folded = tmp_path / "mwa-adapter", tmp_path / "mwa-folded"
    invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, adapter, {"metric": "loss"}), name="adapter.yaml")],
           expected_exit=0)
    invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, folded, {"metric": "loss", "fold": True}),
                                name="folded.yaml")], expected_exit=0)
    assert_matches_peft(folded, base, adapter)


def copy_run(checkpoints: list[Path], folder: Path, edit=None) -> list[Path]:
    """Copy checkpoints into `folder`, applying `edit` to each adapter config."""
    copies = []
    for checkpoint in checkpoints:
        copy = shutil.copytree(checkpoint, folder / checkpoint.name)
        if edit is not None:
            path = copy / "adapter_config.json"
            config = json.loads(path.read_text())
            edit(config)
            path.write_text(json.dumps(config))
        copies.append(copy)
    return copies


def test_mwa_fold_base_not_found(test_zoo, tmp_path):
    # The copies keep `../../base`, which names no folder next to them.
    checkpoints = copy_run(lora_checkpoints(test_zoo)[:2], tmp_path / "run" / "lora")
    output = tmp_path / "never"
    result = invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, output, {"fold": True}))], expected_exit=2)
    text = message_of(result)
    assert f"names the base model '../../base', which is not a folder relative to {checkpoints[0]}" in text
    assert "set `base_model:` in the recipe" in text
    assert not output.exists()


def test_mwa_fold_without_base_name(test_zoo, tmp_path):
    checkpoints = copy_run(lora_checkpoints(test_zoo)[:2], tmp_path / "run",
                           edit=lambda config: config.update(base_model_name_or_path=None))
    result = invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, tmp_path / "never", {"fold": True}))],
                    expected_exit=2)
    assert "has no `base_model_name_or_path`" in message_of(result)


def test_mwa_fold_dora_rejected(test_zoo, tmp_path):
    checkpoints = copy_run(lora_checkpoints(test_zoo)[:2], tmp_path / "run",
                           edit=lambda config: config.update(use_dora=True,
                                                             base_model_name_or_path=str(test_zoo / "lm" / "base")))
    result = invoke(["run", write_recipe(tmp_path, mwa_recipe(checkpoints, tmp_path / "never", {"fold": True}))],
                    expected_exit=2)
    assert "cannot be folded into its base: `use_dora: true` (DoRA magnitude vectors)" in message_of(result)
    assert not (tmp_path / "never").exists()


def test_mwa_fold_full_checkpoints_rejected(llama_fine_tunes, tmp_path):
    recipe = mwa_recipe(llama_fine_tunes, tmp_path / "never", {"metric": "step", "fold": True},
                        [{"step": 1}, {"step": 2}])
    result = invoke(["run", write_recipe(tmp_path, recipe)], expected_exit=1)
    assert "`fold: true` folds an averaged LoRA adapter into its base model, but the models are full checkpoints" \
        in message_of(result)
