"""AdaMerging through `merge run` on checkpoints that transformers wrote: learning, reuse, and `data:` errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from merge_helpers import (
    assert_mentions,
    invoke,
    load_and_generate,
    message_of,
    read_tensors,
    two_task_recipe,
    write_recipe,
)

PROMPTS = ["hello there", "a cat sat", "the dog ran", "one two"]


def write_prompts(folder: Path, name: str) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS))
    return path


def recipe_for(tmp_path: Path, base: Path, fine_tunes: tuple[Path, Path], **options) -> dict:
    return two_task_recipe("adamerging", tmp_path, base, fine_tunes, **options)


def two_tasks(tmp_path: Path) -> dict:
    return {task: {"path": write_prompts(tmp_path, task), "batch_size": 2, "max_length": 16}
            for task in ("alpha", "beta")}


def expected_merge(base: Path, fine_tunes: tuple[Path, Path], coefficients: dict) -> dict[str, torch.Tensor]:
    theta0 = read_tensors(base)
    models = [read_tensors(folder) for folder in fine_tunes]
    result = {}
    for name, row in zip(coefficients["tensors"], coefficients["coefficients"]):
        result[name] = theta0[name].float() + sum(c * (m[name].float() - theta0[name].float())
                                                  for c, m in zip(row, models))
    return result


def test_layer_wise_learns_and_writes(tmp_path, llama_base, llama_fine_tunes):
    parameters = {"granularity": "layer", "steps": 2, "lr": 0.05, "answer_tokens": 2}
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters=parameters,
                                               data=two_tasks(tmp_path)))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = tmp_path / "merged"
    coefficients = json.loads((merged / "adamerging_coefficients.json").read_text())
    assert (merged / "adamerging_coefficients.png").stat().st_size > 0
    assert coefficients["tasks"] == ["alpha", "beta"]
    assert coefficients["granularity"] == "layer"
    assert len(coefficients["losses"]) == 2
    assert all(0.0 <= value <= 1.0 for row in coefficients["coefficients"] for value in row)
    tensors = read_tensors(merged)
    for name, expected in expected_merge(llama_base, llama_fine_tunes, coefficients).items():
        torch.testing.assert_close(tensors[name].float(), expected, rtol=1e-5, atol=1e-6)
    load_and_generate(merged)


def test_coefficients_file_reproduces_merge(tmp_path, llama_base, llama_fine_tunes):
    learned = {"granularity": "task", "steps": 1, "lr": 0.05, "answer_tokens": 2}
    first = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters=learned,
                                              data=two_tasks(tmp_path), output="first"), name="first.yaml")
    invoke(["run", first, "--quiet"], expected_exit=0)

    reuse = {"granularity": "task", "coefficients": tmp_path / "first" / "adamerging_coefficients.json"}
    second = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters=reuse,
                                               data=None, output="second"), name="second.yaml")
    invoke(["run", second, "--quiet"], expected_exit=0)

    first_tensors = read_tensors(tmp_path / "first")
    second_tensors = read_tensors(tmp_path / "second")
    for name, tensor in first_tensors.items():
        torch.testing.assert_close(second_tensors[name], tensor, rtol=0, atol=0)


def test_recipe_coefficient_equals_task_arithmetic(tmp_path, llama_base, llama_fine_tunes):
    ada = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                            parameters={"coefficient": 0.3}, data=None, output="ada"),
                       name="ada.yaml")
    invoke(["run", ada, "--quiet"], expected_exit=0)
    arithmetic = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": llama_base,
        "models": [{"model": folder} for folder in llama_fine_tunes],
        "parameters": {"lambda": 0.3}, "output": {"path": tmp_path / "ta"}}, name="ta.yaml")
    invoke(["run", arithmetic, "--quiet"], expected_exit=0)

    ada_tensors = read_tensors(tmp_path / "ada")
    for name, tensor in read_tensors(tmp_path / "ta").items():
        torch.testing.assert_close(ada_tensors[name], tensor, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "ada" / "adamerging_coefficients.json").exists()


def test_zero_steps_need_no_data(tmp_path, llama_base, llama_fine_tunes):
    ada = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                            parameters={"steps": 0, "init": 0.3}, data=None, output="ada"),
                       name="ada.yaml")
    invoke(["run", ada, "--quiet"], expected_exit=0)
    coefficient = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                              parameters={"coefficient": 0.3}, data=None, output="given"),
                         name="given.yaml")
    invoke(["run", coefficient, "--quiet"], expected_exit=0)

    coefficient_tensors = read_tensors(tmp_path / "given")
    for name, tensor in read_tensors(tmp_path / "ada").items():
        assert torch.equal(tensor, coefficient_tensors[name]), name


def test_missing_data_file_rejected(tmp_path, llama_fine_tunes):
    data = two_tasks(tmp_path)
    data["beta"]["path"] = tmp_path / "absent.jsonl"
    # A base that does not exist: the data problem must come out before any model is opened.
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, tmp_path / "no-base", llama_fine_tunes,
                                               parameters={"steps": 1}, data=data))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"absent\.jsonl", r"not found", r"line \d+")
    assert not (tmp_path / "merged").exists()


def test_empty_data_file_rejected(tmp_path, llama_base, llama_fine_tunes):
    data = two_tasks(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    data["alpha"]["path"] = tmp_path / "empty.jsonl"
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters={"steps": 1},
                                               data=data))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"empty\.jsonl", r"is empty")


def test_unknown_task_suggests_name(tmp_path, llama_base, llama_fine_tunes):
    data = two_tasks(tmp_path)
    data["alpah"] = data.pop("alpha")
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters={"steps": 1},
                                               data=data))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    message = message_of(result)
    assert_mentions(message, r"no model has task `alpah`", r"did you mean `alpha`")
    assert_mentions(message, r"no entry for task `alpha`")


def test_data_key_typo_suggests_name(tmp_path, llama_base, llama_fine_tunes):
    data = two_tasks(tmp_path)
    data["alpha"]["batchsize"] = data["alpha"].pop("batch_size")
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters={"steps": 1},
                                               data=data))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"unknown key `batchsize`", r"did you mean `batch_size`")


def test_data_rejected_for_method_without_learning(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": llama_base,
        "models": [{"model": llama_fine_tunes[0], "task": "x"}, {"model": llama_fine_tunes[1]}],
        "data": {"x": {"path": write_prompts(tmp_path, "x")}}, "output": {"path": tmp_path / "merged"}})

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    message = message_of(result)
    assert_mentions(message, r"task_arithmetic` learns nothing from data, so `data:` would have no effect")
    assert_mentions(message, r"so `task:` would have no effect")


def test_learning_without_data_rejected(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters={"steps": 1},
                                               data=None))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"add a `data:` section", r"coefficients")
