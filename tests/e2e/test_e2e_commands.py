"""The commands that inspect a recipe without merging: `validate`, `plan` and `methods`."""

from __future__ import annotations

import json
import re

from merge_helpers import invoke, write_recipe

METHOD_NAMES = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


def ties_recipe(base, fine_tunes, output) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": 1.0, "density": 0.5}} for fine_tune in fine_tunes],
        "output": {"path": output},
    }


def test_validate_accepts_good_recipe(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    invoke(["validate", recipe], expected_exit=0)

    assert not output.exists()


def test_validate_json_output(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, tmp_path / "merged"))

    result = invoke(["validate", recipe, "--json"], expected_exit=0)

    assert isinstance(json.loads(result.stdout), dict)


def test_validate_finds_vocab_mismatch(tmp_path, llama_base, llama_fine_tunes, llama_resized_vocab):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, [llama_fine_tunes[0], llama_resized_vocab], tmp_path / "merged"))

    result = invoke(["validate", recipe], expected_exit=2)

    assert re.search(r"model\.embed_tokens\.weight|lm_head\.weight", result.output)


def test_plan_json_names_inputs_and_output(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["plan", recipe, "--json"], expected_exit=0)

    text = json.dumps(json.loads(result.stdout))
    assert output.name in text
    for model in [llama_base, *llama_fine_tunes]:
        assert model.name in text, model.name
    assert not output.exists()


def test_plan_tensors_lists_tensors(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, tmp_path / "merged"))

    result = invoke(["plan", recipe, "--json", "--tensors"], expected_exit=0)

    text = json.dumps(json.loads(result.stdout))
    assert "model.layers.0.self_attn.q_proj.weight" in text
    assert "lm_head.weight" in text


def test_plan_without_json_runs(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["plan", recipe], expected_exit=0)

    assert llama_base.name in " ".join(result.output.split())
    assert not output.exists()


def test_methods_listed():
    result = invoke(["methods"], expected_exit=0)

    for name in METHOD_NAMES:
        assert re.search(rf"\b{name}\b", result.output), name
