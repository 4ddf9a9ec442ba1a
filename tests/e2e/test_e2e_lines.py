"""LiNeS through `merge run` and `merge plan`, on tiny checkpoints of several model families."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from merge_helpers import (
    assert_mentions,
    invoke,
    load_and_generate,
    message_of,
    read_tensors,
    write_recipe,
)
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Each family's block names, written out here rather than taken from the package, so that the
# test checks the package's layer parsing against the names transformers writes.
LLAMA_BLOCK = r"^model\.layers\.(\d+)\."
FAMILY_BLOCKS = {
    "qwen2": LLAMA_BLOCK,
    "mistral": LLAMA_BLOCK,
    "gpt2": r"^transformer\.h\.(\d+)\.",
    "bert": r"^encoder\.layer\.(\d+)\.",
}
LAYERS = 3
SMALL_DECODER = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                     tie_word_embeddings=False)


def make_family_model(family: str):
    """Return a tiny randomly initialised model of `family` with LAYERS blocks, the same on every call."""
    torch.manual_seed(0)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL_DECODER))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL_DECODER))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=LAYERS, n_head=2))
    if family == "bert":
        return BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=32))
    raise ValueError(family)


def build_family(folder: Path, family: str, *, seed: int | None = None) -> Path:
    """Save the family's base, or a fine-tune of it (the base plus seeded noise) when `seed` is given."""
    import checkpoints

    model = make_family_model(family)
    if seed is not None:
        checkpoints.add_seeded_deltas(model, seed=seed, scale=0.02)
    model.save_pretrained(folder)
    return folder


def block_of(name: str, pattern: str) -> int | None:
    match = re.match(pattern, name)
    return int(match.group(1)) if match else None


def expected_scale(name: str, pattern: str, alpha: float, beta: float, layers: int) -> float:
    index = block_of(name, pattern)
    return alpha if index is None else alpha + beta * index / (layers - 1)


def lines_recipe(base: Path, fine_tunes, output: Path, *, model_parameters=None, **parameters) -> dict:
    recipe = {
        "merge_method": "lines",
        "base_model": base,
        "models": [{"model": fine_tune, **({"parameters": model_parameters} if model_parameters else {})}
                   for fine_tune in fine_tunes],
        "output": {"path": output},
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def assert_scaled_merge(output: Path, base: Path, fine_tunes, pattern: str, alpha: float, beta: float,
                        layers: int) -> None:
    """Check every merged tensor against θ₀ + λ(ℓ) · Σ τ_t, with ℓ from the test's own block pattern."""
    merged = read_tensors(output)
    base_tensors = read_tensors(base)
    fine_tune_tensors = [read_tensors(fine_tune) for fine_tune in fine_tunes]
    assert sorted(merged) == sorted(base_tensors)
    scaled = 0
    for name, tensor in base_tensors.items():
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor), name
            continue
        task_sum = sum(model[name] - tensor for model in fine_tune_tensors)
        scale = expected_scale(name, pattern, alpha, beta, layers)
        scaled += scale != alpha
        torch.testing.assert_close(merged[name], tensor + scale * task_sum, msg=name)
    assert scaled > 0


@pytest.mark.parametrize("family", sorted(FAMILY_BLOCKS))
def test_family_blocks_scaled_by_depth(tmp_path, family):
    base = build_family(tmp_path / "base", family)
    fine_tunes = [build_family(tmp_path / f"fine-tune-{seed}", family, seed=seed) for seed in (1, 2)]
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, lines_recipe(base, fine_tunes, output, alpha=0.3, beta=0.6))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    assert_scaled_merge(output, base, fine_tunes, FAMILY_BLOCKS[family], 0.3, 0.6, LAYERS)
    loader = AutoModel if family == "bert" else AutoModelForCausalLM
    loaded, info = loader.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]


def test_llama_blocks_scaled_by_depth(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, lines_recipe(llama_base, llama_fine_tunes, output, alpha=0.25, beta=0.5))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    assert_scaled_merge(output, llama_base, llama_fine_tunes, LLAMA_BLOCK, 0.25, 0.5, 2)
    load_and_generate(output)


def test_beta_zero_equals_task_arithmetic(tmp_path, llama_base, llama_fine_tunes):
    """α unset for two unit-weight models is 1/2, so β = 0 writes task arithmetic with λ = 0.5, byte for byte."""
    outputs = {}
    for method, parameters in (("lines", {"beta": 0.0}), ("task_arithmetic", {"lambda": 0.5})):
        outputs[method] = tmp_path / method
        recipe = lines_recipe(llama_base, llama_fine_tunes, outputs[method], **parameters)
        recipe["merge_method"] = method
        invoke(["run", write_recipe(tmp_path, recipe, name=f"{method}.yaml"), "--quiet"], expected_exit=0)

    by_lines, by_task_arithmetic = read_tensors(outputs["lines"]), read_tensors(outputs["task_arithmetic"])
    assert sorted(by_lines) == sorted(by_task_arithmetic)
    for name, tensor in by_task_arithmetic.items():
        assert torch.equal(by_lines[name], tensor), name


def test_single_task_editing(tmp_path, llama_base, llama_fine_tunes):
    """One model with α = 0.4 and β unset (1 − α): the last block is the fine-tune's, the embedding 0.4 of the way."""
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, lines_recipe(llama_base, llama_fine_tunes[:1], output, alpha=0.4))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged, base, fine_tune = read_tensors(output), read_tensors(llama_base), read_tensors(llama_fine_tunes[0])
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], fine_tune[name])
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(merged[name], base[name] + 0.4 * (fine_tune[name] - base[name]))
    load_and_generate(output)


def reference_lines_ties(base_folder: Path, model_folders, densities, beta: float) -> dict[str, torch.Tensor]:
    """LiNeS over TIES as the formulas state it: flatten, trim over the whole model, elect, disjoint mean,
    α = ‖Σ τ‖₁ / ‖τ_MTL‖₁ / T, then λ(ℓ) per tensor.

    The majority sign where the elected sum is exactly 0 is taken over the whole model here and
    over each tensor in the package. The two agree because these random task vectors never cancel exactly.
    """
    base = read_tensors(base_folder)
    names = sorted(name for name, tensor in base.items() if tensor.is_floating_point())
    task_vectors, trimmed = [], []
    for folder, density in zip(model_folders, densities):
        model = read_tensors(folder)
        task_vector = torch.cat([(model[name].double() - base[name].double()).reshape(-1) for name in names])
        d = task_vector.numel()
        q = torch.kthvalue(task_vector.abs(), d - math.floor(Fraction(str(density)) * d)).values
        task_vectors.append(task_vector)
        trimmed.append(task_vector * (task_vector.abs() >= q))
    stacked = torch.stack(trimmed)
    signs = torch.sign(stacked.sum(0))
    signs[signs == 0] = 1.0 if signs.sum() >= 0 else -1.0
    agreeing = (torch.sign(stacked) == signs) & (stacked != 0)
    count = agreeing.sum(0)
    merged = torch.where(count > 0, (stacked * agreeing).sum(0) / count.clamp(min=1), torch.zeros((), dtype=torch.float64))
    alpha = float(torch.stack(task_vectors).sum(0).abs().sum() / merged.abs().sum()) / len(model_folders)

    result, offset = {}, 0
    for name in names:
        numel = base[name].numel()
        scale = expected_scale(name, LLAMA_BLOCK, alpha, beta, 2)
        result[name] = (base[name].double() + scale * merged[offset : offset + numel].view(base[name].shape)).float()
        offset += numel
    return result


def test_ties_alpha_rule_matches_reference(tmp_path, llama_base, llama_fine_tunes):
    densities = [0.2, 0.35]
    output = tmp_path / "merged"
    recipe = lines_recipe(llama_base, llama_fine_tunes, output, inner="ties", beta=0.5)
    for model, density in zip(recipe["models"], densities):
        model["parameters"] = {"density": density}

    result = invoke(["run", write_recipe(tmp_path, recipe)], expected_exit=0)

    assert_mentions(message_of(result), r"statistics pass 3 \(at most 3\)", r"lines: alpha = ")
    merged = read_tensors(output)
    expected = reference_lines_ties(llama_base, list(llama_fine_tunes), densities, 0.5)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    load_and_generate(output)


def test_plan_reports_alpha_pass(tmp_path, llama_base, llama_fine_tunes):
    recipe = lines_recipe(llama_base, llama_fine_tunes, tmp_path / "merged", beta=0.5,
                          model_parameters={"weight": 0.7})

    text = message_of(invoke(["plan", write_recipe(tmp_path, recipe)], expected_exit=0))
    summary = json.loads(invoke(["plan", write_recipe(tmp_path, recipe), "--json"], expected_exit=0).stdout)

    assert_mentions(text, r"up to 1 statistics passes before the merge", r"L1 norms that set the LiNeS alpha")
    assert summary["statistics"]["max_passes"] == 1


def test_unit_weight_plan_has_no_statistics(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, lines_recipe(llama_base, llama_fine_tunes, tmp_path / "merged", beta=0.5))

    summary = json.loads(invoke(["plan", recipe, "--json"], expected_exit=0).stdout)

    assert summary["statistics"] is None


# Errors before any write


def write_blockless_checkpoint(folder: Path, seed: int) -> Path:
    """Write a model whose tensor names have no block container, with a config naming its architecture."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {"encoder.proj.weight": torch.randn(4, 4, generator=generator),
               "head.weight": torch.randn(2, 4, generator=generator)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"architectures": ["ToyNet"], "model_type": "toy"}))
    return folder


def test_unknown_blocks_rejected_before_write(tmp_path):
    base = write_blockless_checkpoint(tmp_path / "base", 0)
    fine_tune = write_blockless_checkpoint(tmp_path / "fine-tune", 1)
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, lines_recipe(base, [fine_tune], output, alpha=0.5))

    result = invoke(["run", recipe], expected_exit=2)

    assert_mentions(message_of(result), r"no tensor of ToyNet lies in a stack of repeated blocks",
                    r"`lines` scales each tensor by its block index")
    assert not output.exists()


def test_missing_beta_rejected(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, lines_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["run", recipe], expected_exit=1)

    assert_mentions(message_of(result), r"`beta` is required when merging 2 models")
    assert not output.exists()


def test_consensus_inner_rejected(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, lines_recipe(llama_base, llama_fine_tunes, output, inner="consensus", beta=0.5))

    result = invoke(["run", recipe], expected_exit=1)

    assert_mentions(message_of(result), r"`inner: consensus` is not implemented for lines")
    assert not output.exists()


def test_alpha_gradient_rejected(tmp_path, llama_base, llama_fine_tunes):
    """A layer gradient would make α vary by tensor, which breaks the linear schedule."""
    recipe = write_recipe(tmp_path, lines_recipe(llama_base, llama_fine_tunes, tmp_path / "merged",
                                                 alpha=[0.2, 0.4], beta=0.5))

    result = invoke(["run", recipe], expected_exit=1)

    assert_mentions(message_of(result), r"`alpha` varies by tensor")
