"""The tall_masks bundle through the CLI: `merge run` writes it and `merge extract` rebuilds each task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import build_bert_family
from merge_helpers import assert_mentions, invoke, load_and_generate, message_of, read_tensors, write_recipe
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

# The three task vectors of the hand-computed TALL masks: τ_MTL = Σ τ_t = [0.4, −0.4, −0.45, 0.2, 0.2, 0.07].
TASK_VECTORS = [
    [0.5, -0.2, 0.1, 0.0, 0.3, -0.05],
    [-0.4, -0.3, 0.05, 0.2, 0.0, 0.1],
    [0.3, 0.1, -0.6, 0.0, -0.1, 0.02],
]
MULTI_TASK_SUM = [0.4, -0.4, -0.45, 0.2, 0.2, 0.07]
MASKS = {
    0.4: [[1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]],
    1.0: [[1, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]],
}
BASE = [1.0, -1.0, 0.5, 2.0, 0.0, 3.0]
# Sizes 1 and 5, so that neither mask fills a whole byte.
TENSORS = {"a.weight": (0, 1), "b.weight": (1, 6)}


def write_vector_checkpoint(folder: Path, values: list[float]) -> Path:
    folder.mkdir(parents=True)
    vector = torch.tensor(values, dtype=torch.float64)
    tensors = {name: vector[start:stop].clone() for name, (start, stop) in TENSORS.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def vector_recipe(tmp_path: Path, mask_lambda: float) -> dict:
    base = write_vector_checkpoint(tmp_path / "base", BASE)
    models = []
    for index, task_vector in enumerate(TASK_VECTORS):
        values = [b + t for b, t in zip(BASE, task_vector)]
        models.append({"model": write_vector_checkpoint(tmp_path / f"task-{index}", values),
                       "parameters": {"mask_lambda": mask_lambda}})
    return {"merge_method": "tall_masks", "base_model": base, "models": models, "dtype": "float64",
            "output": {"path": tmp_path / "bundle"}}


def expected_task(base: dict, fine_tunes: list[dict], task: int, mask_lambda: float, prefix: str = "") -> dict:
    """Compute θ₀ + m_t ⊙ τ_MTL from the checkpoints, with τ_MTL = Σ τ_t and the mask formula written out."""
    expected = {}
    for name, tensor in base.items():
        deltas = [fine_tune[prefix + name] - tensor for fine_tune in fine_tunes]
        multi_task = sum(deltas)
        mask = deltas[task].abs() > mask_lambda * (multi_task - deltas[task]).abs()
        expected[prefix + name] = tensor + mask * multi_task
    return expected


@pytest.mark.parametrize("mask_lambda", sorted(MASKS))
def test_hand_computed_masks_survive_extract(tmp_path, mask_lambda):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, mask_lambda))
    invoke(["run", recipe], expected_exit=0)

    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert [task["name"] for task in manifest["tasks"]] == ["task-0", "task-1", "task-2"]
    assert [task["mask_lambda"] for task in manifest["tasks"]] == [mask_lambda] * 3
    for index, mask in enumerate(MASKS[mask_lambda]):
        output = tmp_path / f"extracted-{index}"
        invoke(["extract", tmp_path / "bundle", "--task", f"task-{index}", "-o", output], expected_exit=0)
        rebuilt = read_tensors(output)
        vector = torch.cat([rebuilt[name] for name in TENSORS])
        expected = [b + m * t for b, m, t in zip(BASE, mask, MULTI_TASK_SUM)]
        torch.testing.assert_close(vector, torch.tensor(expected, dtype=torch.float64), msg=f"task {index}")


def test_bundle_stores_packed_masks(tmp_path):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, 0.4))
    result = invoke(["run", recipe], expected_exit=0)

    assert_mentions(message_of(result), r"wrote a bundle of 10 tensors", r"against a bit-packing floor of 0\.\d{4}")
    stored = read_tensors(tmp_path / "bundle")
    assert stored["mask/task-0/a.weight"].tolist() == [0b10000000]
    assert stored["mask/task-0/b.weight"].tolist() == [0b10011000]
    assert stored["mask/task-2/b.weight"].tolist() == [0b01000000]
    torch.testing.assert_close(stored["tau/b.weight"], torch.tensor(MULTI_TASK_SUM[1:], dtype=torch.float64))
    assert torch.equal(stored["base/a.weight"], torch.tensor(BASE[:1], dtype=torch.float64))


def test_unknown_task_lists_tasks(tmp_path):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, 0.4))
    invoke(["run", recipe], expected_exit=0)

    result = invoke(["extract", tmp_path / "bundle", "--task", "nope"], expected_exit=2)

    assert_mentions(message_of(result), r"task 'nope' is not in the bundle", r"its tasks are: task-0, task-1, task-2")
    assert not (tmp_path / "bundle-nope").exists()


def test_extract_rejects_non_bundle(tmp_path, llama_base):
    result = invoke(["extract", llama_base, "--task", "x", "-o", tmp_path / "out"], expected_exit=2)

    assert_mentions(message_of(result), r"is not a tall_masks bundle: bundle.json is missing")


def test_extract_output_exists_needs_force(tmp_path):
    recipe = write_recipe(tmp_path, vector_recipe(tmp_path, 0.4))
    invoke(["run", recipe], expected_exit=0)
    output = tmp_path / "task"
    invoke(["extract", tmp_path / "bundle", "--task", "task-0", "-o", output], expected_exit=0)

    result = invoke(["extract", tmp_path / "bundle", "--task", "task-0", "-o", output], expected_exit=3)
    assert_mentions(message_of(result), r"already exists", r"pass --force to replace it")
    invoke(["extract", tmp_path / "bundle", "--task", "task-0", "-o", output, "--force"], expected_exit=0)


def test_llama_task_loads_and_matches_formula(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": llama_base,
        "models": [{"model": llama_fine_tunes[0], "parameters": {"mask_lambda": 0.3}},
                   {"model": llama_fine_tunes[1], "parameters": {"mask_lambda": 0.5}}],
        "output": {"path": tmp_path / "bundle"},
    })
    invoke(["run", recipe], expected_exit=0)
    task = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][1]["name"]
    invoke(["extract", tmp_path / "bundle", "--task", task], expected_exit=0)

    output = tmp_path / f"bundle-{task}"
    load_and_generate(output)
    base = read_tensors(llama_base)
    expected = expected_task(base, [read_tensors(path) for path in llama_fine_tunes], 1, 0.5)
    rebuilt = read_tensors(output)
    assert set(rebuilt) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_all_ones_masks_equal_task_arithmetic(tmp_path, llama_base, llama_fine_tunes):
    """λ_t = 0 keeps every entry where τ_t ≠ 0, which the seeded fine-tunes change everywhere."""
    models = [{"model": path, "parameters": {"mask_lambda": 0.0}} for path in llama_fine_tunes]
    invoke(["run", write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": llama_base, "models": models,
        "output": {"path": tmp_path / "bundle"}}, name="bundle.yaml")], expected_exit=0)
    invoke(["run", write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": llama_base,
        "models": [{"model": path} for path in llama_fine_tunes], "parameters": {"lambda": 1.0},
        "output": {"path": tmp_path / "ta"}}, name="ta.yaml")], expected_exit=0)
    task = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][0]["name"]
    invoke(["extract", tmp_path / "bundle", "--task", task, "-o", tmp_path / "task"], expected_exit=0)

    rebuilt, task_arithmetic = read_tensors(tmp_path / "task"), read_tensors(tmp_path / "ta")
    assert set(rebuilt) == set(task_arithmetic)
    for name, tensor in task_arithmetic.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_ties_inner_stores_ties_vector(tmp_path, llama_base, llama_fine_tunes):
    """With `inner: ties`, θ₀ + τ_MTL equals the `ties` merge with λ = 1 and the disjoint sum."""
    ties = {"density": 0.2, "scope": "model", "normalize": False}
    invoke(["run", write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": llama_base,
        "models": [{"model": path} for path in llama_fine_tunes], "parameters": {"inner": "ties", **ties},
        "output": {"path": tmp_path / "bundle"}}, name="bundle.yaml")], expected_exit=0)
    invoke(["run", write_recipe(tmp_path, {
        "merge_method": "ties", "base_model": llama_base,
        "models": [{"model": path} for path in llama_fine_tunes], "parameters": {"lambda": 1.0, **ties},
        "output": {"path": tmp_path / "ties"}}, name="ties.yaml")], expected_exit=0)

    stored, merged = read_tensors(tmp_path / "bundle"), read_tensors(tmp_path / "ties")
    for name, tensor in merged.items():
        torch.testing.assert_close(stored[f"base/{name}"] + stored[f"tau/{name}"], tensor, rtol=0, atol=1e-6,
                                   msg=name)


def test_per_task_models_match_extract(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": llama_base,
        "models": [{"model": path} for path in llama_fine_tunes], "parameters": {"per_task_models": True},
        "output": {"path": tmp_path / "bundle"},
    })
    invoke(["run", recipe], expected_exit=0)

    for record in json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"]:
        name = record["name"]
        invoke(["extract", tmp_path / "bundle", "--task", name, "-o", tmp_path / name], expected_exit=0)
        written, extracted = read_tensors(tmp_path / "bundle" / "models" / name), read_tensors(tmp_path / name)
        assert set(written) == set(extracted)
        for key, tensor in extracted.items():
            assert torch.equal(written[key], tensor), key


def test_vocab_align_rejected(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": llama_base,
        "models": [{"model": path} for path in llama_fine_tunes],
        "tokenizer": {"source": "base", "vocab": "align"}, "output": {"path": tmp_path / "bundle"},
    })

    result = invoke(["run", recipe], expected_exit=1)
    assert_mentions(message_of(result), r"`tall_masks` does not support `tokenizer.vocab: align`")
    assert not (tmp_path / "bundle").exists()

    result = invoke(["validate", recipe], expected_exit=1)
    assert_mentions(message_of(result), r"`tall_masks` does not support `tokenizer.vocab: align`")


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    return build_bert_family(tmp_path_factory.mktemp("bert-tall-masks"))


def test_bert_task_extracts_with_own_head(tmp_path, bert_family):
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": bert_family["base"],
        "models": [{"model": bert_family["ft-1"]}, {"model": bert_family["ft-2"]}],
        "output": {"path": tmp_path / "bundle"},
    })
    invoke(["run", recipe], expected_exit=0)
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert [task["prefix"] for task in manifest["tasks"]] == ["bert.", "bert."]
    assert {head["name"] for head in manifest["tasks"][1]["heads"]} == {"classifier.weight", "classifier.bias"}

    invoke(["extract", tmp_path / "bundle", "--task", "ft-2", "-o", tmp_path / "ft-2"], expected_exit=0)

    model, info = BertForSequenceClassification.from_pretrained(tmp_path / "ft-2", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model.config.num_labels == 3
    fine_tunes = [read_tensors(bert_family["ft-1"]), read_tensors(bert_family["ft-2"])]
    expected = expected_task(read_tensors(bert_family["base"]), fine_tunes, 1, 0.4, prefix="bert.")
    rebuilt = read_tensors(tmp_path / "ft-2")
    for name, tensor in expected.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(rebuilt["classifier.weight"], fine_tunes[1]["classifier.weight"])
    assert torch.equal(rebuilt["classifier.bias"], fine_tunes[1]["classifier.bias"])


def test_zoo_bundle_near_floor(tmp_path, test_zoo):
    lm = test_zoo / "lm"
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": lm / "base",
        "models": [{"model": lm / name} for name in ("ft-first_last", "ft-next_letters", "ft-last_two")],
        "output": {"path": tmp_path / "bundle"},
    })

    result = invoke(["run", recipe, "--json"], expected_exit=0)

    storage = json.loads(result.stdout)["storage"]
    assert storage["tasks"] == 3
    assert storage["floor"] == pytest.approx((2 + 3 / 32) / 4)
    assert abs(storage["ratio"] - storage["floor"]) <= 0.02 * storage["floor"]
