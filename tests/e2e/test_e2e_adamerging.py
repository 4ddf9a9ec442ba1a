"""AdaMerging through `merge run` on checkpoints that transformers wrote: learning, reuse, and `data:` errors.

The causal LM tests use two tiny Llama fine-tunes. The classifier tests use two tiny BERT fine-tunes
of a bare `BertModel` base, each with its own head (2 and 3 labels), as the AdaMerging paper merges.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import build_bert_family, build_tokenizer
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
TEXTS = ["the cat sat on the mat.", "a dog ran", "is it raining", "she did not go home."]


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


# ---------------------------------------------------------------------------------------------------
# Sequence classifiers: each task's own head scores the merged encoder


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    folders = build_bert_family(tmp_path_factory.mktemp("bert-adamerging"))
    # The character tokenizer's 32 tokens fit the tiny BERT's vocabulary of 64.
    build_tokenizer().save_pretrained(folders["base"])
    return folders


def write_texts(folder: Path, name: str, rows: list[dict]) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def classifier_data(tmp_path: Path) -> dict:
    # Labelled rows, as the zoo's eval.jsonl files are: the labels are ignored.
    rows = [{"text": text, "label": index % 2} for index, text in enumerate(TEXTS)]
    return {task: {"path": write_texts(tmp_path, task, rows), "batch_size": len(TEXTS), "max_length": 16}
            for task in ("alpha", "beta")}


def bert_recipe(tmp_path: Path, bert_family: dict[str, Path], **options) -> dict:
    return two_task_recipe("adamerging", tmp_path, bert_family["base"],
                           (bert_family["ft-1"], bert_family["ft-2"]), **options)


def mean_entropy(classifier_folder: Path, encoder: dict[str, torch.Tensor], tokenizer) -> float:
    """Mean entropy of a fine-tune's label distribution over TEXTS, with `encoder` in place of its own."""
    from transformers import BertForSequenceClassification

    classifier = BertForSequenceClassification.from_pretrained(classifier_folder, dtype=torch.float32).eval()
    classifier.bert.load_state_dict(encoder)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        probs = classifier(**batch).logits.softmax(-1)
    return float(-(probs * probs.log()).sum(-1).mean())


def test_classifiers_learn_with_own_heads(tmp_path, bert_family):
    from transformers import AutoTokenizer, BertModel

    parameters = {"granularity": "layer", "steps": 3, "lr": 0.05}
    recipe = write_recipe(tmp_path, bert_recipe(tmp_path, bert_family, parameters=parameters,
                                                data=classifier_data(tmp_path)))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    merged = tmp_path / "merged"
    coefficients = json.loads((merged / "adamerging_coefficients.json").read_text())
    assert coefficients["tasks"] == ["alpha", "beta"]
    assert len(coefficients["losses"]) == 3
    assert all(0.0 <= value <= 1.0 for row in coefficients["coefficients"] for value in row)
    assert any(value != 0.3 for row in coefficients["coefficients"] for value in row)
    theta0 = read_tensors(bert_family["base"])
    fine_tunes = [read_tensors(bert_family[name]) for name in ("ft-1", "ft-2")]
    tensors = read_tensors(merged)
    assert set(tensors) == set(theta0)
    for name, row in zip(coefficients["tensors"], coefficients["coefficients"]):
        expected = theta0[name] + sum(c * (model[f"bert.{name}"] - theta0[name]) for c, model in zip(row, fine_tunes))
        torch.testing.assert_close(tensors[name], expected, rtol=1e-5, atol=1e-6)

    # Every text fits one batch, so the first step's loss is the entropy at the initial 0.3, summed over tasks.
    tokenizer = AutoTokenizer.from_pretrained(bert_family["base"])
    initial = {name: theta0[name] + sum(0.3 * (model[f"bert.{name}"] - theta0[name]) for model in fine_tunes)
               for name in theta0}
    expected_loss = sum(mean_entropy(bert_family[name], initial, tokenizer) for name in ("ft-1", "ft-2"))
    assert coefficients["losses"][0] == pytest.approx(expected_loss, rel=1e-5)
    # The merge loads as the base's class, with no tensor missing.
    _, info = BertModel.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"]


def test_classifier_zero_steps_equal_init(tmp_path, bert_family):
    zero = write_recipe(tmp_path, bert_recipe(tmp_path, bert_family, parameters={"steps": 0, "init": 0.3},
                                              data=classifier_data(tmp_path), output="zero"), name="zero.yaml")
    invoke(["run", zero, "--quiet"], expected_exit=0)
    coefficient = write_recipe(tmp_path, bert_recipe(tmp_path, bert_family, parameters={"coefficient": 0.3},
                                               data=None, output="given"), name="given.yaml")
    invoke(["run", coefficient, "--quiet"], expected_exit=0)

    coefficient_tensors = read_tensors(tmp_path / "given")
    for name, tensor in read_tensors(tmp_path / "zero").items():
        assert torch.equal(tensor, coefficient_tensors[name]), name


def test_classifier_row_without_text_rejected(tmp_path, bert_family):
    data = classifier_data(tmp_path)
    # A causal LM's prompt row is not a classifier's text.
    data["beta"]["path"] = write_texts(tmp_path, "prompts", [{"text": "a cat"}, {"prompt": "a dog", "label": 1}])
    recipe = write_recipe(tmp_path, bert_recipe(tmp_path, bert_family, parameters={"steps": 1}, data=data))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    assert_mentions(message_of(result), r"prompts\.jsonl:2", r'expected an object with a string "text"')
    assert not (tmp_path / "merged").exists()


def test_classifier_rejects_answer_positions(tmp_path, bert_family):
    recipe = write_recipe(tmp_path, bert_recipe(tmp_path, bert_family, parameters={"steps": 1, "positions": "first"},
                                                data=classifier_data(tmp_path)))

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"`positions` sets the causal LM objective", r"remove it")
    assert not (tmp_path / "merged").exists()


def test_classifier_beside_bare_encoder_rejected(tmp_path, bert_family):
    # A bare BertModel has no head to score, so it cannot join the classifiers' objective.
    bare = shutil.copytree(bert_family["base"], tmp_path / "bare")
    recipe = write_recipe(tmp_path, two_task_recipe(
        "adamerging", tmp_path, bert_family["base"], (bert_family["ft-1"], bare),
        parameters={"steps": 1}, data=classifier_data(tmp_path)))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    assert_mentions(message_of(result), r"only some models are sequence classifiers: .*ft-1",
                    r"ForSequenceClassification config, or none")
    assert not (tmp_path / "merged").exists()
