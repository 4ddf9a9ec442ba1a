"""PCB-Merging through `merge run` on checkpoints that transformers wrote, against a flattened-model reference."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from merge_helpers import assert_mentions, invoke, load_and_generate, message_of, read_tensors, write_recipe


def exact_floor(fraction: float, count: int) -> int:
    return math.floor(Fraction(str(fraction)) * count)


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Min–max normalise each row, with 0 for a constant row."""
    low = values.min(dim=-1, keepdim=True).values
    high = values.max(dim=-1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, 1), torch.zeros(()))


def reference_pcb(base_folder: Path, model_folders: list[Path], *, density: float, clamp_ratio: float,
                  variant: str) -> dict[str, torch.Tensor]:
    """PCB as the formulas state it, on each task vector flattened over every floating-point tensor.

    Sorts give the clamp bounds and the drop threshold, and torch.softmax gives the softmaxes of
    the paper variant, so none of the package's chunking or radix selection is involved.
    """
    base = read_tensors(base_folder)
    names = sorted(name for name, tensor in base.items() if tensor.is_floating_point())
    rows = []
    for folder in model_folders:
        model = read_tensors(folder)
        rows.append(torch.cat([(model[name].float() - base[name].float()).reshape(-1) for name in names]))
    task_vectors = torch.stack(rows)
    count, d = task_vectors.shape

    magnitudes = task_vectors.abs()
    clamped = task_vectors
    if variant == "reference" or clamp_ratio > 0:
        ordered = magnitudes.sort(dim=1).values
        low = ordered[:, exact_floor(clamp_ratio, d)].unsqueeze(1)
        high = ordered[:, exact_floor(1 - clamp_ratio, d) - 1].unsqueeze(1)
        magnitudes = torch.minimum(torch.maximum(magnitudes, low), high)
        clamped = torch.sign(task_vectors) * magnitudes

    if variant == "reference":
        beta = torch.exp(count * min_max(magnitudes) ** 2) * torch.tanh(task_vectors * task_vectors.sum(0))
        floor = beta.sort(dim=1).values[:, exact_floor(1 - density, d)].unsqueeze(1)
        scores = min_max(torch.minimum(torch.maximum(beta, floor), beta.max(dim=1, keepdim=True).values))
    else:
        intra = torch.softmax(count * min_max(clamped * clamped), dim=1)
        inter = sum(torch.softmax(min_max(clamped * clamped[j]), dim=1) for j in range(count))
        beta = intra * inter
        cut = beta.topk(exact_floor(density, d), dim=1).values[:, -1:]
        scores = beta * (beta >= cut)
    merged = (scores * clamped).sum(0) / scores.sum(0).clamp(min=1e-12)

    result, offset = {}, 0
    for name in names:
        numel = base[name].numel()
        result[name] = base[name].float() + merged[offset : offset + numel].view(base[name].shape)
        offset += numel
    return result


def pcb_recipe(base: Path, fine_tunes, output: Path, **parameters) -> dict:
    return {
        "merge_method": "pcb",
        "base_model": base,
        "models": [{"model": fine_tune} for fine_tune in fine_tunes],
        "parameters": parameters,
        "output": {"path": output},
    }


@pytest.mark.parametrize(("variant", "clamp_ratio"), [("paper", 0.0), ("reference", 0.01)])
def test_model_scope_matches_flattened_reference(tmp_path, llama_base, llama_fine_tunes, variant, clamp_ratio):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, pcb_recipe(llama_base, llama_fine_tunes, output, density=0.2,
                                               clamp_ratio=clamp_ratio, variant=variant))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(output)
    expected = reference_pcb(llama_base, list(llama_fine_tunes), density=0.2, clamp_ratio=clamp_ratio,
                             variant=variant)
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    load_and_generate(output)


def test_tensor_scope_differs_from_model_scope(tmp_path, llama_base, llama_fine_tunes):
    outputs = {}
    for scope in ("model", "tensor"):
        outputs[scope] = tmp_path / scope
        recipe = write_recipe(tmp_path, pcb_recipe(llama_base, llama_fine_tunes, outputs[scope], scope=scope),
                              name=f"{scope}.yaml")
        invoke(["run", recipe, "--quiet"], expected_exit=0)

    by_model, by_tensor = read_tensors(outputs["model"]), read_tensors(outputs["tensor"])
    assert any(not torch.equal(by_model[name], by_tensor[name]) for name in by_model)
    load_and_generate(outputs["tensor"])


def test_run_logs_statistics(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, pcb_recipe(llama_base, llama_fine_tunes, tmp_path / "merged", density=0.2))

    text = message_of(invoke(["run", recipe], expected_exit=0))

    assert_mentions(text, r"statistics pass 1 \(at most 4\)", r"PCB keeps [\d,]+ of [\d,]+ task-vector entries")


def test_plan_reports_statistics_passes(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, pcb_recipe(llama_base, llama_fine_tunes, tmp_path / "merged",
                                               variant="reference", clamp_ratio=0.01))

    summary = json.loads(invoke(["plan", recipe, "--json"], expected_exit=0).stdout)

    assert summary["statistics"]["max_passes"] == 7


def test_clamp_ratio_at_half_rejected(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, pcb_recipe(llama_base, llama_fine_tunes, output, clamp_ratio=0.5))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"`clamp_ratio` is 0.5, but it must be below 0.5")
    assert not output.exists()
