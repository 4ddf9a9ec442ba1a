"""Every merge method, run through the CLI on checkpoints that `transformers` wrote and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_helpers import (
    invoke,
    load_and_generate,
    read_tensors,
    write_recipe,
)

METHOD_RECIPES = {
    "linear": {"parameters": {"normalize": True}, "weights": [0.6, 0.4], "uses_base": False},
    "task_arithmetic": {"parameters": {"lambda": 0.8}, "weights": [1.0, 0.5], "uses_base": True},
    "ties": {"parameters": {"sign_election": "trimmed"}, "weights": [1.0, 0.5], "density": 0.5, "uses_base": True},
    "dare_linear": {"parameters": {}, "weights": [1.0, 0.5], "density": 0.5, "uses_base": True},
    "dare_ties": {"parameters": {"sign_election": "weighted"}, "weights": [1.0, 0.5], "density": 0.5, "uses_base": True},
}


def method_recipe(method: str, base: Path, fine_tunes: tuple[Path, Path], output: Path) -> dict:
    spec = METHOD_RECIPES[method]
    models = []
    for fine_tune, weight in zip(fine_tunes, spec["weights"]):
        parameters = {"weight": weight}
        if "density" in spec:
            parameters["density"] = spec["density"]
        models.append({"model": fine_tune, "parameters": parameters})
    recipe = {"merge_method": method, "models": models, "seed": 0, "output": {"path": output}}
    if spec["uses_base"]:
        recipe["base_model"] = base
    if spec["parameters"]:
        recipe["parameters"] = spec["parameters"]
    return recipe


@pytest.mark.parametrize("method", sorted(METHOD_RECIPES))
def test_method_merges_tiny_llama(method, tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, method_recipe(method, llama_base, llama_fine_tunes, output))

    invoke(["run", recipe, "--device", "cpu", "--quiet"], expected_exit=0)

    load_and_generate(output)
    merged = read_tensors(output)
    base = read_tensors(llama_base)
    assert sorted(merged) == sorted(base)
    for name, tensor in merged.items():
        assert tensor.shape == base[name].shape, name
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
    # Every fine-tune moved every tensor, so a merge that changed nothing went wrong.
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_linear_normalize_keeps_values(tmp_path, llama_base):
    """Weights 0.1 and 1.0 on the same model: normalized, the merge is that model again."""
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": llama_base, "parameters": {"weight": 0.1}},
                {"model": llama_base, "parameters": {"weight": 1.0}},
            ],
            "parameters": {"normalize": True},
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    for name, tensor in read_tensors(llama_base).items():
        torch.testing.assert_close(merged[name], tensor, msg=name)
    load_and_generate(output)


def test_linear_without_normalize_scales_values(tmp_path, llama_base):
    """Weights 0.1 and 1.0 on the same model, not normalized: every value is 1.1 times the model's."""
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": llama_base, "parameters": {"weight": 0.1}},
                {"model": llama_base, "parameters": {"weight": 1.0}},
            ],
            "parameters": {"normalize": False},
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    for name, tensor in read_tensors(llama_base).items():
        torch.testing.assert_close(merged[name], 1.1 * tensor, msg=name)
    load_and_generate(output)


def test_task_arithmetic_reproduces_fine_tune(tmp_path, llama_base, llama_fine_tunes):
    """base + 1.0 * (fine-tune - base) is the fine-tune, up to float32 rounding."""
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": llama_base,
            "models": [{"model": llama_fine_tunes[0], "parameters": {"weight": 1.0}}],
            "parameters": {"lambda": 1.0},
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    for name, tensor in read_tensors(llama_fine_tunes[0]).items():
        torch.testing.assert_close(merged[name], tensor, msg=name)
    load_and_generate(output)


def test_tied_qwen2_stays_tied(tmp_path, qwen2_tied_base, qwen2_tied_fine_tune):
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": qwen2_tied_base,
            "models": [{"model": qwen2_tied_fine_tune, "parameters": {"weight": 0.5}}],
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    assert "lm_head.weight" not in merged
    assert sorted(merged) == sorted(read_tensors(qwen2_tied_base))
    assert json.loads((output / "config.json").read_text())["tie_word_embeddings"] is True

    model = load_and_generate(output)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = load_and_generate(qwen2_tied_base)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_sharded_input_merges(tmp_path, llama_base_sharded, llama_fine_tunes):
    assert len(list(llama_base_sharded.glob("model-*-of-*.safetensors"))) >= 3
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": llama_base_sharded,
            "models": [
                {"model": llama_fine_tunes[0], "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": llama_fine_tunes[1], "parameters": {"weight": 1.0, "density": 0.5}},
            ],
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    load_and_generate(output)
    assert sorted(read_tensors(output)) == sorted(read_tensors(llama_base_sharded))


def test_sharded_base_matches_single_file(tmp_path, llama_base, llama_base_sharded, llama_fine_tunes):
    """The same base, read from shards or from one file, gives the same merge."""
    outputs = {}
    for label, base in [("single", llama_base), ("sharded", llama_base_sharded)]:
        outputs[label] = tmp_path / label
        recipe = write_recipe(
            tmp_path,
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [{"model": llama_fine_tunes[0], "parameters": {"weight": 0.7}}],
                "output": {"path": outputs[label]},
            },
            name=f"{label}.yaml",
        )
        invoke(["run", recipe, "--quiet"], expected_exit=0)

    single = read_tensors(outputs["single"])
    sharded = read_tensors(outputs["sharded"])
    assert sorted(single) == sorted(sharded)
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name
    load_and_generate(outputs["sharded"])


def one_fine_tune_recipe(base, fine_tune, output, weight) -> dict:
    """task_arithmetic with lambda 1: a tensor with weight 0 is the base's, with weight 1 the fine-tune's."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": weight}}],
        "parameters": {"lambda": 1.0},
        "output": {"path": output},
    }


def test_weight_gradient_over_layers(tmp_path, llama_base, llama_fine_tunes):
    """Weight [0, 1] over two layers: layer 0 and the embedding stay base, layer 1, norm and head move."""
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, one_fine_tune_recipe(llama_base, llama_fine_tunes[0], output, [0.0, 1.0]))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    base = read_tensors(llama_base)
    fine_tune = read_tensors(llama_fine_tunes[0])
    for name, tensor in merged.items():
        if name.startswith("model.layers.0.") or name == "model.embed_tokens.weight":
            torch.testing.assert_close(tensor, base[name], msg=name)
        else:
            torch.testing.assert_close(tensor, fine_tune[name], msg=name)
    load_and_generate(output)


def test_weight_filter_list(tmp_path, llama_base, llama_fine_tunes):
    """Weight 1 for tensors whose name contains self_attn, 0 for the rest."""
    output = tmp_path / "merged"
    weight = [{"filter": "self_attn", "value": 1.0}, {"value": 0.0}]
    recipe = write_recipe(tmp_path, one_fine_tune_recipe(llama_base, llama_fine_tunes[0], output, weight))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    base = read_tensors(llama_base)
    fine_tune = read_tensors(llama_fine_tunes[0])
    for name, tensor in merged.items():
        expected = fine_tune[name] if "self_attn" in name else base[name]
        torch.testing.assert_close(tensor, expected, msg=name)
    load_and_generate(output)


def test_single_file_and_bin_inputs(tmp_path, llama_base, llama_fine_tunes, llama_fine_tune_pytorch_bin):
    """A base given as its .safetensors file and a fine-tune stored as pytorch_model.bin."""
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": llama_base / "model.safetensors",
            "models": [{"model": llama_fine_tune_pytorch_bin, "parameters": {"weight": 1.0}}],
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    for name, tensor in read_tensors(llama_fine_tunes[0]).items():
        torch.testing.assert_close(merged[name], tensor, msg=name)
    load_and_generate(output)


def test_relative_paths_from_working_folder(tmp_path, monkeypatch, llama_base, llama_fine_tunes):
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    for source in [llama_base, llama_fine_tunes[0]]:
        (work / "checkpoints" / source.name).symlink_to(source, target_is_directory=True)
    recipe = write_recipe(
        tmp_path,
        one_fine_tune_recipe(
            f"checkpoints/{llama_base.name}", f"./checkpoints/{llama_fine_tunes[0].name}", "merged", 0.5
        ),
    )
    monkeypatch.chdir(work)

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    assert not (tmp_path / "merged").exists()
    load_and_generate(work / "merged")
