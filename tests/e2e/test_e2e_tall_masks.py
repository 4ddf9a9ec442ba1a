"""The tall_masks bundle through the CLI: `merge run` writes it, `merge extract` rebuilds each task, and
`mask_lambda: auto` chooses λ_t on each task's labelled data."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import build_bert_family
from merge_helpers import assert_mentions, invoke, load_and_generate, message_of, read_tensors, write_recipe
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification, PreTrainedTokenizerFast
from reference_vectors import BASE, TASK_VECTORS

# The three task vectors of the hand-computed TALL masks: τ_MTL = Σ τ_t = [0.4, −0.4, −0.45, 0.2, 0.2, 0.07].
MULTI_TASK_SUM = [0.4, -0.4, -0.45, 0.2, 0.2, 0.07]
MASKS = {
    0.4: [[1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]],
    1.0: [[1, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]],
}
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

    invoke(["extract", tmp_path / "bundle", "--task", "2", "-o", tmp_path / "ft-2"], expected_exit=0)

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


# Choosing λ_t on labelled data (`mask_lambda: auto`)

PAD_ID, EOS_ID = 0, 2
PROMPTS = ["".join(letters) for letters in itertools.product("abcdefgh", repeat=3)]
GRID = "0.5, 1.0, 5.0"


def generate_answers(folder: Path, prompts: list[str], tensors: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Return the greedy answers of transformers' `generate` (4 tokens at most), cut before the first EOS or pad.

    With `tensors`, the model loaded from `folder` takes those weights first.
    """
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if tensors is not None:
        model.load_state_dict(tensors, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompts, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                   eos_token_id=[EOS_ID, PAD_ID], pad_token_id=PAD_ID)
    answers = []
    for row in generated[:, ids.shape[1]:].tolist():
        stop = next((index for index, token in enumerate(row) if token in (EOS_ID, PAD_ID)), len(row))
        answers.append(tokenizer.decode(row[:stop]))
    return answers


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory, llama_fine_tunes) -> dict[str, Path]:
    """For each fine-tune, 10 prompts labelled with its own greedy answers that end with EOS and hold no special token."""
    folder = tmp_path_factory.mktemp("tall-masks-data")
    files = {}
    for task, fine_tune in zip(("one", "two"), llama_fine_tunes):
        tokenizer = AutoTokenizer.from_pretrained(fine_tune)
        answers = generate_answers(fine_tune, PROMPTS)
        rows = [{"prompt": prompt, "answer": answer} for prompt, answer in zip(PROMPTS, answers)
                if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < 4 and "<" not in answer]
        assert len(rows) >= 10, f"only {len(rows)} answers of {fine_tune} end within 4 tokens"
        files[task] = write_rows(folder / f"{task}.jsonl", rows[:10])
    return files


def auto_recipe(tmp_path: Path, base: Path, fine_tunes, data: dict[str, Path] | None, **parameters) -> dict:
    recipe = {
        "merge_method": "tall_masks", "base_model": base,
        "models": [{"model": fine_tunes[0], "task": "one", "parameters": {"mask_lambda": 1.0}},
                   {"model": fine_tunes[1], "task": "two"}],
        "parameters": {"mask_lambda": "auto", "lambda_grid": GRID, **parameters},
        "output": {"path": tmp_path / "bundle"},
    }
    if data is not None:
        recipe["data"] = {task: {"path": path, "batch_size": 4} for task, path in data.items()}
    return recipe


def independent_score(base: Path, fine_tunes, task: int, mask_lambda: float, data: Path) -> int:
    """Score θ₀ + m_t ⊙ τ_MTL, written out in torch, with transformers' `generate` on the rows of `data`."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tensors = expected_task(read_tensors(base), [read_tensors(path) for path in fine_tunes], task, mask_lambda)
    answers = generate_answers(fine_tunes[task], [row["prompt"] for row in rows], tensors)
    return sum(answer == row["answer"] for answer, row in zip(answers, rows))


def test_auto_lambda_matches_independent_scores(tmp_path, llama_base, llama_fine_tunes, labelled_data):
    recipe = write_recipe(tmp_path, auto_recipe(tmp_path, llama_base, llama_fine_tunes, labelled_data))

    result = invoke(["run", recipe], expected_exit=0)

    searched = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][1]
    selection = searched["lambda_selection"]
    expected = {value: independent_score(llama_base, llama_fine_tunes, 1, value, labelled_data["two"])
                for value in (0.5, 1.0, 5.0)}
    assert [(item["mask_lambda"], item["correct"]) for item in selection["scores"]] == list(expected.items())
    assert len(set(expected.values())) > 1, "the grid should score differently, or the choice proves nothing"
    best = max(expected.values())
    chosen = min((value for value, score in expected.items() if score == best), key=lambda value: abs(value - 0.4))
    assert selection["mask_lambda"] == chosen
    assert searched["mask_lambda"] == chosen
    assert selection["searched"]
    assert selection["examples"] == 10
    assert_mentions(message_of(result), r"λ_t per task, scored by exact match of the greedy answer",
                    rf"llama-fine-tune-2 .* {chosen} ", r"llama-fine-tune-1 .* 1\.0 \(given\)")


def test_fixed_lambda_scored_on_data(tmp_path, llama_base, llama_fine_tunes, labelled_data):
    recipe = write_recipe(tmp_path, auto_recipe(tmp_path, llama_base, llama_fine_tunes, labelled_data))
    invoke(["run", recipe], expected_exit=0)

    record = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][0]

    assert record["mask_lambda"] == 1.0
    assert not record["lambda_selection"]["searched"]
    score = independent_score(llama_base, llama_fine_tunes, 0, 1.0, labelled_data["one"])
    assert record["lambda_selection"]["scores"] == [{"mask_lambda": 1.0, "correct": score, "accuracy": score / 10}]


def test_chosen_lambda_builds_mask(tmp_path, llama_base, llama_fine_tunes, labelled_data):
    recipe = write_recipe(tmp_path, auto_recipe(tmp_path, llama_base, llama_fine_tunes, labelled_data))
    invoke(["run", recipe], expected_exit=0)
    chosen = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][1]["mask_lambda"]

    invoke(["extract", tmp_path / "bundle", "--task", "two", "-o", tmp_path / "task"], expected_exit=0)

    expected = expected_task(read_tensors(llama_base), [read_tensors(path) for path in llama_fine_tunes], 1, chosen)
    rebuilt = read_tensors(tmp_path / "task")
    for name, tensor in expected.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_auto_lambda_with_ties_inner(tmp_path, llama_base, llama_fine_tunes, labelled_data):
    """With `inner: ties`, the whole-model trim thresholds reach the selection as they reach the bundle pass."""
    recipe = write_recipe(tmp_path, auto_recipe(tmp_path, llama_base, llama_fine_tunes, labelled_data, inner="ties",
                                                density=0.5))
    invoke(["run", recipe, "--quiet"], expected_exit=0)
    selection = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][1]["lambda_selection"]
    invoke(["extract", tmp_path / "bundle", "--task", "two", "-o", tmp_path / "task"], expected_exit=0)

    rows = [json.loads(line) for line in labelled_data["two"].read_text().splitlines()]
    answers = generate_answers(tmp_path / "task", [row["prompt"] for row in rows])

    correct = sum(answer == row["answer"] for answer, row in zip(answers, rows))
    assert [item["correct"] for item in selection["scores"] if item["mask_lambda"] == selection["mask_lambda"]] == [correct]


def test_plan_describes_bundle(tmp_path, llama_base, llama_fine_tunes, labelled_data):
    recipe = write_recipe(tmp_path, auto_recipe(tmp_path, llama_base, llama_fine_tunes, labelled_data,
                                                per_task_models=True))

    text = message_of(invoke(["plan", recipe], expected_exit=0))
    summary = json.loads(invoke(["plan", recipe, "--json"], expected_exit=0).stdout)

    assert_mentions(text, r"a tall_masks bundle, not a checkpoint", r"tau/NAME: τ_MTL, \d+ tensors",
                    r"mask/TASK/NAME: 2 bit-packed masks, 1 bit per entry, for one, two",
                    r"bundle\.json \(the manifest\)", r"models/TASK/: 2 rebuilt task models",
                    r"storage estimate: the bundle's tensors take 0\.\d{4} of the 3 input checkpoints",
                    r"one given, 1\.0; scored by exact match of the greedy answer on .*one\.jsonl \(10 examples\)",
                    r"two chosen from 0\.5, 1\.0, 5\.0 by exact match of the greedy answer on .*two\.jsonl "
                    r"\(10 examples\)", r"the one nearest 0\.4 is kept")
    bundle = summary["bundle"]
    assert [task["mask_lambda"] for task in bundle["tasks"]] == [1.0, "auto"]
    assert bundle["lambda_grid"] == [0.5, 1.0, 5.0]
    assert bundle["per_task_models"]
    assert summary["total_bytes"] == bundle["weight_bytes"] + sum(bundle["task_model_bytes"])

    written = json.loads(invoke(["run", recipe, "--json", "--quiet"], expected_exit=0).stdout)
    assert written["total_bytes"] == bundle["weight_bytes"]
    assert written["storage"]["ratio"] == pytest.approx(bundle["storage"]["ratio"])
    assert [task["name"] for task in written["tasks"]] == ["one", "two"]


def test_plan_of_given_lambdas_without_data(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": llama_base,
        "models": [{"model": path, "parameters": {"mask_lambda": 0.3}} for path in llama_fine_tunes],
        "output": {"path": tmp_path / "bundle"}})

    text = message_of(invoke(["plan", recipe], expected_exit=0))

    assert_mentions(text, r"llama-fine-tune-1 given, 0\.3 llama-fine-tune-2 given, 0\.3")
    assert "chosen from" not in text


def invalid_rows(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "bad.jsonl", [{"prompt": "abc", "answer": "d"}, {"prompt": "abd"}])


@pytest.mark.parametrize(("case", "exit_code", "patterns"), [
    ("no data", 1, [r"`mask_lambda: auto` chooses λ_t on each task's labelled data, but the recipe has no `data:`",
                    r"`one`, `two`"]),
    ("missing file", 1, [r"data\.two\.path \(line \d+\): data file .*nope\.jsonl not found"]),
    ("empty file", 1, [r"data\.two\.path \(line \d+\): data file .*empty\.jsonl is empty"]),
    ("row without answer", 2, [r"bad\.jsonl:2: expected a string \"answer\"",
                               r"fix: write one JSON object per line with a string \"prompt\" and a string \"answer\""]),
    ("grid without auto", 1, [r"`lambda_grid` applies only with `mask_lambda: auto`"]),
    ("bad grid", 1, [r"`lambda_grid` must be numbers separated by commas, such as \"0\.2, 0\.3, 0\.4\", got '0\.5, x'"]),
    ("auto in gradient", 1, [r"`mask_lambda: auto` cannot be part of a gradient list; give it alone"]),
    ("typo", 1, [r"`mask_lambda` must be a number or `auto`, got 'autp'"]),
])
def test_selection_recipe_errors(tmp_path, llama_base, llama_fine_tunes, labelled_data, case, exit_code, patterns):
    data = dict(labelled_data)
    recipe = auto_recipe(tmp_path, llama_base, llama_fine_tunes, data)
    if case == "no data":
        recipe.pop("data")
    elif case == "missing file":
        recipe["data"]["two"]["path"] = tmp_path / "nope.jsonl"
    elif case == "empty file":
        recipe["data"]["two"]["path"] = write_rows(tmp_path / "empty.jsonl", [])
    elif case == "row without answer":
        recipe["data"]["two"]["path"] = invalid_rows(tmp_path)
    elif case == "grid without auto":
        recipe["parameters"]["mask_lambda"] = 0.4
        recipe.pop("data")
    elif case == "bad grid":
        recipe["parameters"]["lambda_grid"] = "0.5, x"
    elif case == "auto in gradient":
        recipe["parameters"]["mask_lambda"] = [0.2, "auto"]
    elif case == "typo":
        recipe["parameters"]["mask_lambda"] = "autp"
    path = write_recipe(tmp_path, recipe)

    for command in (["validate", path], ["run", path]):
        text = message_of(invoke(command, expected_exit=exit_code))
        assert_mentions(text, *patterns)
    assert not (tmp_path / "bundle").exists()


def test_consensus_rejects_auto(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, {
        "merge_method": "consensus", "base_model": llama_base, "models": [{"model": path} for path in llama_fine_tunes],
        "parameters": {"mask_lambda": "auto"}, "output": {"path": tmp_path / "merged"}})

    result = invoke(["validate", recipe], expected_exit=1)

    assert_mentions(message_of(result), r"`mask_lambda` must be a number, got 'auto'")


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `w0` … `w59` for the tiny BERT (vocabulary 64), adding [CLS] and [SEP]."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{index}" for index in range(60)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def test_classifier_lambda_scored_with_own_head(tmp_path, bert_family):
    fine_tunes = [shutil.copytree(bert_family[name], tmp_path / name) for name in ("ft-1", "ft-2")]
    tokenizer = bert_tokenizer()
    for folder in fine_tunes:
        tokenizer.save_pretrained(folder)
    texts = [" ".join(f"w{(7 * row + 3 * word) % 60}" for word in range(2 + row % 5)) for row in range(16)]
    data = {name: write_rows(tmp_path / f"{name}.jsonl", [{"text": text, "label": row % labels}
                                                          for row, text in enumerate(texts)])
            for name, labels in (("one", 2), ("two", 3))}
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": bert_family["base"],
        "models": [{"model": fine_tunes[0], "task": "one"}, {"model": fine_tunes[1], "task": "two"}],
        "parameters": {"mask_lambda": "auto", "lambda_grid": "0.0, 1.0"},
        "data": {task: {"path": path} for task, path in data.items()}, "output": {"path": tmp_path / "bundle"}})

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    selection = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"][1]["lambda_selection"]
    assert selection["metric"] == "accuracy"
    invoke(["extract", tmp_path / "bundle", "--task", "two", "-o", tmp_path / "task"], expected_exit=0)
    model = BertForSequenceClassification.from_pretrained(tmp_path / "task").eval()
    with torch.no_grad():
        predictions = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    correct = sum(prediction == row % 3 for row, prediction in enumerate(predictions))
    assert [item["correct"] for item in selection["scores"] if item["mask_lambda"] == selection["mask_lambda"]] == [correct]


def test_classifier_label_out_of_range(tmp_path, bert_family):
    fine_tunes = [shutil.copytree(bert_family[name], tmp_path / name) for name in ("ft-1", "ft-2")]
    for folder in fine_tunes:
        bert_tokenizer().save_pretrained(folder)
    data = {"one": write_rows(tmp_path / "one.jsonl", [{"text": "w1 w2", "label": 1}]),
            "two": write_rows(tmp_path / "two.jsonl", [{"text": "w1 w2", "label": 3}])}
    recipe = write_recipe(tmp_path, {
        "merge_method": "tall_masks", "base_model": bert_family["base"],
        "models": [{"model": fine_tunes[0], "task": "one"}, {"model": fine_tunes[1], "task": "two"}],
        "parameters": {"mask_lambda": "auto"}, "data": {task: {"path": path} for task, path in data.items()},
        "output": {"path": tmp_path / "bundle"}})

    result = invoke(["validate", recipe], expected_exit=2)

    assert_mentions(message_of(result), r"two\.jsonl:1: label 3 is not a label of the classifier, which has labels 0 to 2")


def test_generic_scorer_matches_zoo_accuracy(test_zoo):
    """The scorer that `merge eval` and the λ selection share gives the zoo builder's own accuracies."""
    from mergekit_plus.zoo.evaluate import CAUSAL_LM, load_causal_lm, read_labelled_examples, score_examples
    from mergekit_plus.zoo.lm import accuracy

    family = json.loads((test_zoo / "zoo.json").read_text())["families"]["lm"]
    tokenizer = AutoTokenizer.from_pretrained(test_zoo / family["base"])
    for task, folder in family["fine_tunes"].items():
        network = load_causal_lm(test_zoo / folder)
        examples = read_labelled_examples(test_zoo / family["eval_data"][task], CAUSAL_LM)
        score = score_examples(network, tokenizer, examples, kind=CAUSAL_LM)
        assert score.accuracy == accuracy(network, examples), task
        assert score.accuracy == family["accuracy"]["fine_tunes"][task], task
