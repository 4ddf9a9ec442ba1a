"""Frank-Wolfe merging through `merge run` on checkpoints that transformers wrote: learning, reuse, errors."""

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

ROWS = [("hello there", " a"), ("a cat sat", " b"), ("the dog ran", " c"), ("one two", " d")]


def write_rows(folder: Path, name: str, rows=ROWS) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt, "answer": answer}) + "\n" for prompt, answer in rows))
    return path


def recipe_for(tmp_path: Path, base: Path, fine_tunes: tuple[Path, Path], **options) -> dict:
    return two_task_recipe("frank_wolfe", tmp_path, base, fine_tunes, **options)


def alpha_only(tmp_path: Path) -> dict:
    # Task beta has no data: its model is a candidate only.
    return {"alpha": {"path": write_rows(tmp_path, "alpha"), "batch_size": 2, "max_length": 16}}


def expected_merge(base: Path, fine_tunes: tuple[Path, Path], record: dict) -> dict[str, torch.Tensor]:
    theta0 = read_tensors(base)
    models = [read_tensors(folder) for folder in fine_tunes]
    result = {}
    for name, row in zip(record["tensors"], record["coefficients"]["values"]):
        result[name] = row[0] * theta0[name].double() + sum(c * m[name].double() for c, m in zip(row[1:], models))
    return result


def run_task_arithmetic(tmp_path: Path, base: Path, fine_tunes: tuple[Path, Path]) -> dict[str, torch.Tensor]:
    recipe = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": base, "models": [{"model": folder} for folder in fine_tunes],
        "parameters": {"lambda": 0.3}, "output": {"path": tmp_path / "ta"}}, name="ta.yaml")
    invoke(["run", recipe, "--quiet"], expected_exit=0)
    return read_tensors(tmp_path / "ta")


def test_hard_learns_with_candidate_without_data(tmp_path, llama_base, llama_fine_tunes):
    parameters = {"iterations": 2, "step_size": 1.0}
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters=parameters,
                                               data=alpha_only(tmp_path)))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = tmp_path / "merged"
    record = json.loads((merged / "frank_wolfe.json").read_text())
    assert [candidate["data"] for candidate in record["candidates"]] == [True, False]
    assert len(record["iterations"]) == 2
    assert all(entry["picks"][0]["vertex"] in ("alpha", "beta", "initial") for entry in record["iterations"])
    assert set(record["final_losses"]) == {"alpha"}
    for row in record["coefficients"]["values"]:
        assert abs(sum(row) - 1.0) < 1e-9
    tensors = read_tensors(merged)
    for name, expected in expected_merge(llama_base, llama_fine_tunes, record).items():
        torch.testing.assert_close(tensors[name].double(), expected, rtol=1e-5, atol=1e-6)
    load_and_generate(merged)


def test_zero_iterations_equal_task_arithmetic(tmp_path, llama_base, llama_fine_tunes):
    # No data is needed when nothing is learned.
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                               parameters={"iterations": 0}, data=None))
    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(tmp_path / "merged")
    for name, tensor in run_task_arithmetic(tmp_path, llama_base, llama_fine_tunes).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)


def test_ties_zero_iterations_equal_ties(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                               parameters={"iterations": 0, "merge_fn": "ties"}, data=None))
    invoke(["run", recipe, "--quiet"], expected_exit=0)
    ties = write_recipe(tmp_path, {
        "merge_method": "ties", "base_model": llama_base, "models": [{"model": folder} for folder in llama_fine_tunes],
        "parameters": {"lambda": 0.3, "density": 0.2, "normalize": False, "scope": "model"},
        "output": {"path": tmp_path / "ties"}}, name="ties.yaml")
    invoke(["run", ties, "--quiet"], expected_exit=0)

    merged = read_tensors(tmp_path / "merged")
    for name, tensor in read_tensors(tmp_path / "ties").items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)


def test_ties_step_writes_learned_weights(tmp_path, llama_base, llama_fine_tunes):
    data = {task: {"path": write_rows(tmp_path, task), "batch_size": 4} for task in ("alpha", "beta")}
    parameters = {"iterations": 1, "merge_fn": "ties", "granularity": "tensor", "step_size": 1.0}
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters=parameters,
                                               data=data))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    record = json.loads((tmp_path / "merged" / "frank_wolfe.json").read_text())
    assert record["coefficients"] is None
    counts = record["iterations"][0]["picks"][0]["counts"]
    assert sum(counts.values()) == len(record["tensors"])
    load_and_generate(tmp_path / "merged")


def test_soft_picks_per_task(tmp_path, llama_base, llama_fine_tunes):
    data = {task: {"path": write_rows(tmp_path, task), "batch_size": 4} for task in ("alpha", "beta")}
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                               parameters={"variant": "soft", "iterations": 2}, data=data))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    record = json.loads((tmp_path / "merged" / "frank_wolfe.json").read_text())
    for entry in record["iterations"]:
        picks = entry["picks"]
        assert [pick["task"] for pick in picks] == ["alpha", "beta"]
        assert sorted(pick["vertex"] for pick in picks) == ["alpha", "beta"]
    load_and_generate(tmp_path / "merged")


def test_coefficients_file_reproduces_merge(tmp_path, llama_base, llama_fine_tunes):
    first = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                              parameters={"iterations": 1, "granularity": "tensor"},
                                              data=alpha_only(tmp_path), output="first"), name="first.yaml")
    invoke(["run", first, "--quiet"], expected_exit=0)

    reuse = {"coefficients": tmp_path / "first" / "frank_wolfe.json"}
    second = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters=reuse,
                                               data=None, output="second"), name="second.yaml")
    invoke(["run", second, "--quiet"], expected_exit=0)

    second_tensors = read_tensors(tmp_path / "second")
    for name, tensor in read_tensors(tmp_path / "first").items():
        torch.testing.assert_close(second_tensors[name], tensor, rtol=0, atol=0)


def test_recipe_coefficients_skip_learning(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes,
                                               parameters={"coefficient": 0.3}, data=None))
    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = read_tensors(tmp_path / "merged")
    for name, tensor in run_task_arithmetic(tmp_path, llama_base, llama_fine_tunes).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "merged" / "frank_wolfe.json").exists()


def test_missing_data_file_rejected(tmp_path, llama_fine_tunes):
    data = {"alpha": {"path": tmp_path / "absent.jsonl"}}
    # A base that does not exist: the data problem must come out before any model is opened.
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, tmp_path / "no-base", llama_fine_tunes,
                                               parameters={}, data=data))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"absent\.jsonl", r"not found", r"line \d+")
    assert not (tmp_path / "merged").exists()


def test_row_without_answer_rejected(tmp_path, llama_fine_tunes):
    path = tmp_path / "alpha.jsonl"
    path.write_text('{"prompt": "a b", "answer": " c"}\n{"prompt": "d e"}\n')
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, tmp_path / "no-base", llama_fine_tunes,
                                               parameters={}, data={"alpha": {"path": path}}))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"alpha\.jsonl:2: the row has no \"answer\"")


def test_empty_data_section_rejected(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters={}, data={}))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"needs data for at least one task")


def test_learning_without_data_rejected(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, recipe_for(tmp_path, llama_base, llama_fine_tunes, parameters={}, data=None))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"add a `data:` section", r"iterations: 0")
