"""Consensus Merging run through the CLI: hand-computed values, tiny Llama checkpoints, the log and the checks."""

from __future__ import annotations

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
from reference_vectors import BASE, TASK_VECTORS

# Three task vectors of six entries. With λ_t = 0.4 the TALL masks keep 3, 2, 1, 1, 1 and 2 of the
# three tasks at the six entries, so k = 2 keeps indices 0, 1 and 5 of τ_MTL = Σ τ_t, and half the
# entries are selfish (one mask) with none catastrophic (no mask).
CONSENSUS_TA = [0.4, -0.4, 0.0, 0.0, 0.0, 0.07]
TENSORS = {"a.weight": (0, 2), "b.weight": (2, 4), "c.weight": (4, 6)}


def write_vector_checkpoint(folder: Path, values: list[float]) -> Path:
    """Write `values` as the three small tensors of TENSORS in one safetensors file."""
    folder.mkdir(parents=True)
    vector = torch.tensor(values, dtype=torch.float32)
    tensors = {name: vector[start:stop].clone() for name, (start, stop) in TENSORS.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def vector_recipe(tmp_path: Path, **parameters) -> dict:
    base = write_vector_checkpoint(tmp_path / "base", BASE)
    models = []
    for index, task_vector in enumerate(TASK_VECTORS):
        values = [b + t for b, t in zip(BASE, task_vector)]
        models.append({"model": write_vector_checkpoint(tmp_path / f"model-{index}", values),
                       "parameters": {"mask_lambda": 0.4}})
    return {"merge_method": "consensus", "base_model": base, "models": models, "parameters": parameters,
            "output": {"path": tmp_path / "merged"}}


def llama_recipe(base: Path, fine_tunes: tuple[Path, Path], output: Path, method: str = "consensus",
                 **parameters) -> dict:
    return {"merge_method": method, "base_model": base, "models": [{"model": path} for path in fine_tunes],
            "parameters": parameters, "output": {"path": output}}


def test_hand_computed_vector_and_log(tmp_path):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, k=2))

    result = invoke(["run", recipe], expected_exit=0)

    merged = read_tensors(tmp_path / "merged")
    vector = torch.cat([merged[name].reshape(-1) for name in sorted(TENSORS)])
    torch.testing.assert_close(vector, torch.tensor(BASE) + torch.tensor(CONSENSUS_TA))
    assert_mentions(message_of(result), r"0\.00% are catastrophic", r"50\.00% selfish",
                    r"consensus mask keeps 50\.00%")


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
def test_merges_tiny_llama(inner, tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    parameters = {"inner": inner, "k": 1, "lambda": 0.8}
    if inner == "ties":
        parameters["density"] = 0.5
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, output, **parameters))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    load_and_generate(output)
    merged = read_tensors(output)
    base = read_tensors(llama_base)
    assert sorted(merged) == sorted(base)
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name])


def test_k_zero_matches_task_arithmetic(tmp_path, llama_base, llama_fine_tunes):
    consensus = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, tmp_path / "consensus", k=0,
                                                    **{"lambda": 0.6}), name="consensus.yaml")
    arithmetic = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, tmp_path / "arithmetic",
                                                     method="task_arithmetic", **{"lambda": 0.6}),
                              name="arithmetic.yaml")

    invoke(["run", consensus, "--quiet"], expected_exit=0)
    invoke(["run", arithmetic, "--quiet"], expected_exit=0)

    expected = read_tensors(tmp_path / "arithmetic")
    for name, tensor in read_tensors(tmp_path / "consensus").items():
        assert torch.equal(tensor, expected[name]), name


def test_k_above_task_count_returns_base(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, tmp_path / "merged", k=3))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    base = read_tensors(llama_base)
    for name, tensor in read_tensors(tmp_path / "merged").items():
        assert torch.equal(tensor, base[name]), name


def test_ties_setting_without_ties_rejected(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, llama_recipe(llama_base, llama_fine_tunes, tmp_path / "merged", density=0.5))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"`density` applies only with `inner: ties`")
    assert not (tmp_path / "merged").exists()
