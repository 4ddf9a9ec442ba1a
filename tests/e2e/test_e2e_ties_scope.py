"""TIES with `scope: model`, the trim over the whole flattened model, run through the CLI."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

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
from reference_vectors import BASE, TASK_VECTORS

# The TIES test vector: three task vectors of six entries and their dis-mean at k = 0.5. The
# rule |τ| ≥ (d − floor(k·d))-th smallest |τ| keeps four entries of each, counting both of the
# tied 0.1 and −0.1 of the third, so the trim must see all six entries at once.
DIS_MEAN = [0.4, -0.25, -0.6, 0.2, 0.3, 0.1]
# The six entries as three tensors, in the sorted key order of the flattening: the tied entries
# of the third task vector land in `a.weight` and `c.weight`.
TENSORS = {"a.weight": (0, 2), "b.weight": (2, 4), "c.weight": (4, 6)}


def write_vector_checkpoint(folder: Path, values: list[float]) -> Path:
    """Write `values` as the three small tensors of TENSORS in one safetensors file."""
    folder.mkdir(parents=True)
    vector = torch.tensor(values, dtype=torch.float32)
    tensors = {name: vector[start:stop].clone() for name, (start, stop) in TENSORS.items()}
    tensors["b.weight"] = tensors["b.weight"].view(1, 2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def vector_recipe(tmp_path: Path, **parameters) -> dict:
    base = write_vector_checkpoint(tmp_path / "base", BASE)
    models = []
    for index, task_vector in enumerate(TASK_VECTORS):
        values = [b + t for b, t in zip(BASE, task_vector)]
        models.append({"model": write_vector_checkpoint(tmp_path / f"model-{index}", values),
                       "parameters": {"weight": 1.0, "density": 0.5}})
    recipe = {"merge_method": "ties", "base_model": base, "models": models, "output": {"path": tmp_path / "merged"}}
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def merged_vector(folder: Path) -> torch.Tensor:
    merged = read_tensors(folder)
    return torch.cat([merged[name].reshape(-1) for name in sorted(TENSORS)])


def test_reference_vector_across_tensors(tmp_path):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, scope="model"))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    expected = torch.tensor(BASE) + torch.tensor(DIS_MEAN)
    torch.testing.assert_close(merged_vector(tmp_path / "merged"), expected)


def test_tensor_scope_trims_each_tensor(tmp_path):
    """Per tensor, density 0.5 keeps one of two entries, so the first task vector loses −0.2 at index 1."""
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, scope="tensor"))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    expected = torch.tensor(BASE) + torch.tensor([0.4, 0.0, -0.6, 0.2, 0.3, 0.1])
    torch.testing.assert_close(merged_vector(tmp_path / "merged"), expected)


def test_run_logs_statistics_passes(tmp_path):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path))

    result = invoke(["run", recipe], expected_exit=0)

    assert_mentions(message_of(result), r"statistics pass 1 \(at most 3\)", r"statistics pass 1 done",
                    r"the trim keeps 4 of 6 task-vector entries")


# The whole-model trim on a real checkpoint, against a reference written from the formula


def flattened_task_vector(model: dict[str, torch.Tensor], base: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([(model[name].float() - base[name].float()).reshape(-1) for name in names])


def reference_ties(base_folder: Path, model_folders: list[Path], densities: list[float]) -> dict[str, torch.Tensor]:
    """TIES as the reference code computes it: flatten, trim at the whole-model threshold, elect, dis-mean.

    The majority sign of a coordinate whose sum is exactly 0 is taken over the whole model here
    and over the tensor in the package. They differ only where nonzero trimmed entries cancel
    exactly, which these random task vectors never do.
    """
    base = read_tensors(base_folder)
    names = sorted(name for name, tensor in base.items() if tensor.is_floating_point())
    trimmed = []
    for folder, density in zip(model_folders, densities):
        task_vector = flattened_task_vector(read_tensors(folder), base, names)
        d = task_vector.numel()
        # floor(k·d) in exact decimal arithmetic: 0.35 · 20640 is 7224, but 7223.999… in doubles.
        q = torch.kthvalue(task_vector.abs(), d - math.floor(Fraction(str(density)) * d)).values
        trimmed.append(task_vector * (task_vector.abs() >= q))
    stacked = torch.stack(trimmed)

    signs = torch.sign(stacked.sum(0))
    signs[signs == 0] = 1.0 if signs.sum() >= 0 else -1.0
    agreeing = (torch.sign(stacked) == signs) & (stacked != 0)
    count = agreeing.sum(0)
    merged = torch.where(count > 0, (stacked * agreeing).sum(0) / count.clamp(min=1), torch.zeros(()))

    result, offset = {}, 0
    for name in names:
        numel = base[name].numel()
        result[name] = base[name].float() + merged[offset : offset + numel].view(base[name].shape)
        offset += numel
    return result


def llama_recipe(base: Path, fine_tunes: tuple[Path, Path], densities: list[float], output: Path, **parameters) -> dict:
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"density": density}}
                   for fine_tune, density in zip(fine_tunes, densities)],
        "output": {"path": output},
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def test_default_scope_matches_whole_model_reference(tmp_path, llama_base, llama_fine_tunes):
    """Without a `scope` key the trim is over the whole model, as the formula flattens it."""
    densities = [0.2, 0.35]
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, densities, output))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    expected = reference_ties(llama_base, list(llama_fine_tunes), densities)
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    load_and_generate(output)


def test_model_scope_differs_from_tensor_scope(tmp_path, llama_base, llama_fine_tunes):
    """Whole-model and per-tensor trims keep different entries of the real checkpoint's task vectors."""
    outputs = {}
    for scope in ("model", "tensor"):
        outputs[scope] = tmp_path / scope
        recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, [0.2, 0.2], outputs[scope],
                                                     scope=scope), name=f"{scope}.yaml")
        invoke(["run", recipe, "--quiet"], expected_exit=0)

    by_model, by_tensor = read_tensors(outputs["model"]), read_tensors(outputs["tensor"])
    assert any(not torch.equal(by_model[name], by_tensor[name]) for name in by_model)


def test_model_scope_with_aligned_vocabulary(tmp_path, llama_base, llama_fine_tunes, llama_resized_vocab):
    output = tmp_path / "merged"
    recipe = llama_recipe(llama_base, (llama_fine_tunes[0], llama_resized_vocab), [0.3, 0.3], output)
    recipe["tokenizer"] = {"source": llama_resized_vocab, "vocab": "align"}
    recipe_path = write_recipe(tmp_path, recipe)

    invoke(["run", recipe_path, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    assert merged["model.embed_tokens.weight"].shape[0] == 34
    assert all(torch.isfinite(tensor).all() for tensor in merged.values())
    load_and_generate(output)


# Plans and recipe errors


def test_plan_reports_statistics_passes(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, [0.2, 0.2], tmp_path / "merged"))

    text = message_of(invoke(["plan", recipe], expected_exit=0))
    summary = json.loads(invoke(["plan", recipe, "--json"], expected_exit=0).stdout)

    assert_mentions(text, r"up to 3 statistics passes before the merge", r"trim threshold")
    assert summary["statistics"]["max_passes"] == 3
    assert summary["statistics"]["read_bytes_per_pass"] > 0


def test_plan_tensor_scope_has_no_statistics(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, [0.2, 0.2], tmp_path / "merged",
                                                 scope="tensor"))

    summary = json.loads(invoke(["plan", recipe, "--json"], expected_exit=0).stdout)

    assert summary["statistics"] is None


def test_density_varying_by_tensor_rejected(tmp_path, llama_base, llama_fine_tunes):
    densities = [[{"filter": "self_attn", "value": 0.3}, {"value": 0.2}], 0.2]
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, densities, output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"`density` of models\[0\] varies by tensor", r"scope: model",
                    r"set `scope: tensor`")
    assert not output.exists()


def test_density_varying_by_tensor_allowed_per_tensor(tmp_path, llama_base, llama_fine_tunes):
    densities = [[{"filter": "self_attn", "value": 0.3}, {"value": 0.2}], 0.2]
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, densities, tmp_path / "merged",
                                                 scope="tensor"))

    invoke(["run", recipe, "--quiet"], expected_exit=0)


def test_scope_varying_by_tensor_rejected(tmp_path, llama_base, llama_fine_tunes):
    scope = [{"filter": "mlp", "value": "tensor"}, {"value": "model"}]
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, [0.2, 0.2], tmp_path / "merged",
                                                 scope=scope))

    result = invoke(["validate", recipe], expected_exit=1)

    assert_mentions(message_of(result), r"`scope` varies by tensor", r"one value for the whole merge")


def test_ties_without_scope_explains(tmp_path, llama_base, llama_fine_tunes):
    """A mergekit TIES recipe has no `scope`; the run states that the trim differs from mergekit's."""
    recipe = write_recipe(tmp_path, {
        "merge_method": "ties", "base_model": llama_base,
        "models": [{"model": path, "parameters": {"density": 0.5}} for path in llama_fine_tunes],
        "output": {"path": tmp_path / "merged"},
    })
    result = invoke(["run", recipe], expected_exit=0)
    assert "Add `scope: tensor`" in message_of(result)
