"""AdaMerging: the merge operator against hand-computed vectors, and the learning loop's invariants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mergekit_plus.learn.adamerging import (
    TaskClassifier,
    TaskPrompts,
    _read_task_vectors,
    classification_entropy,
    learn_classifier_coefficients,
    learn_coefficients,
    trim_thresholds,
)
from mergekit_plus.methods import adamerging, get_method, task_arithmetic
from mergekit_plus.zoo.evaluate import load_causal_lm

TASK_VECTORS = torch.tensor([
    [0.5, -0.2, 0.1, 0.0, 0.3, -0.05],
    [-0.4, -0.3, 0.05, 0.2, 0.0, 0.1],
    [0.3, 0.1, -0.6, 0.0, -0.1, 0.02],
], dtype=torch.float64)
BASE = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5], dtype=torch.float64)
DEFAULTS = {param.name: param.default for param in adamerging.PARAMS if not param.per_model}


def merge(coefficients, *, task_vectors="plain", thresholds=None, base=BASE):
    params = {**DEFAULTS, "task_vectors": task_vectors}
    thresholds = thresholds or [None] * len(coefficients)
    model_params = [{"coefficient": c, "threshold": q} for c, q in zip(coefficients, thresholds)]
    tensors = [base + row for row in TASK_VECTORS]
    return adamerging.operator(base, tensors, params=params, model_params=model_params, seeds=[0, 0, 0],
                               compute_dtype=torch.float64)


def test_method_is_registered():
    assert get_method("adamerging") is adamerging.METHOD


def test_init_coefficients_equal_task_arithmetic():
    expected = task_arithmetic.operator(
        BASE, [BASE + row for row in TASK_VECTORS], params={"lambda": 0.3, "normalize": False},
        model_params=[{"weight": 1.0}] * 3, seeds=[0, 0, 0], compute_dtype=torch.float64)
    torch.testing.assert_close(merge([0.3, 0.3, 0.3]), expected)


def test_per_model_coefficients():
    expected = BASE + 0.1 * TASK_VECTORS[0] + 0.5 * TASK_VECTORS[1] + 1.0 * TASK_VECTORS[2]
    torch.testing.assert_close(merge([0.1, 0.5, 1.0]), expected)


def test_ties_vectors_match_dis_sum():
    # TIES with density 0.5 over the six entries keeps the four largest of each row: dis-sum below.
    # A zero base keeps θᵢ − θ₀ exactly equal to the rows, so no entry falls just under its threshold.
    vectors = [{"w": row} for row in TASK_VECTORS]
    thresholds = trim_thresholds(vectors, 0.5)
    assert thresholds == pytest.approx([0.1, 0.1, 0.1])
    result = merge([1.0, 1.0, 1.0], task_vectors="ties", thresholds=thresholds, base=torch.zeros_like(BASE))
    dis_sum = torch.tensor([0.8, -0.5, -0.6, 0.2, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(result, dis_sum)


def test_trim_threshold_extremes():
    vectors = [{"w": row} for row in TASK_VECTORS]
    assert trim_thresholds(vectors, 1.0) == [0.0, 0.0, 0.0]
    assert trim_thresholds(vectors, 0.0) == [float("inf")] * 3


def test_missing_coefficient_raises():
    with pytest.raises(ValueError, match="no coefficient for this tensor"):
        merge([0.3, None, 0.3])


def test_threshold_with_plain_vectors_rejected():
    params = {**DEFAULTS, "task_vectors": "plain"}
    problems = adamerging.check_params(params, [{"coefficient": None, "threshold": 0.1}])
    assert problems and "task_vectors: ties" in problems[0]


class _Read:
    def __init__(self, folder: Path, name: str):
        from mergekit_plus.io.reader import CheckpointReader
        from mergekit_plus.io.sources import resolve_source

        self.input = type("Input", (), {"reader": CheckpointReader(resolve_source(str(folder)))})()
        self.info = type("Info", (), {"name": name})()


def _learning_inputs(base_folder: Path, fine_tunes: tuple[Path, ...]):
    network = load_causal_lm(base_folder)
    names = [name for name, _ in network.named_parameters()]
    jobs = [type("Job", (), {"name": name, "base": _Read(base_folder, name),
                             "models": tuple(_Read(folder, name) for folder in fine_tunes)})() for name in names]
    base, vectors = _read_task_vectors(jobs, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    prompts = [TaskPrompts(["hello there", "a cat", "the dog sat"], 2, 16) for _ in fine_tunes]
    return network, tokenizer, base, vectors, prompts


def _params(**overrides):
    return {**DEFAULTS, "answer_tokens": 3, **overrides}


def test_zero_steps_keep_init(llama_base: Path, llama_fine_tunes: tuple[Path, Path]):
    network, tokenizer, base, vectors, prompts = _learning_inputs(llama_base, llama_fine_tunes)
    for granularity in ("task", "layer"):
        learned = learn_coefficients(network, tokenizer, base, vectors, prompts,
                                     params=_params(granularity=granularity, steps=0), seed=0,
                                     device=torch.device("cpu"))
        assert len(learned.values) == len(base)
        assert all(value == pytest.approx(0.3) for row in learned.values for value in row)
        assert learned.losses == []


def test_clamp_keeps_coefficients_in_range(llama_base: Path, llama_fine_tunes: tuple[Path, Path]):
    network, tokenizer, base, vectors, prompts = _learning_inputs(llama_base, llama_fine_tunes)
    learned = learn_coefficients(network, tokenizer, base, vectors, prompts,
                                 params=_params(granularity="layer", steps=3, lr=5.0, clamp=True), seed=0,
                                 device=torch.device("cpu"))
    values = torch.tensor(learned.values)
    assert bool((values >= 0).all())
    assert bool((values <= 1).all())
    assert len(learned.losses) == 3


def test_task_wise_coefficients_move(llama_base: Path, llama_fine_tunes: tuple[Path, Path]):
    network, tokenizer, base, vectors, prompts = _learning_inputs(llama_base, llama_fine_tunes)
    learned = learn_coefficients(network, tokenizer, base, vectors, prompts,
                                 params=_params(granularity="task", steps=8, lr=0.05, clamp=False,
                                                positions="first"), seed=0, device=torch.device("cpu"))
    values = torch.tensor(learned.values)
    assert bool((values == values[0]).all()), "task-wise coefficients must be the same for every tensor"
    assert not torch.allclose(values, torch.full_like(values, 0.3))


@pytest.fixture(scope="module")
def bert_classifiers(tmp_path_factory):
    """Two tiny BERT classifiers (2 and 3 labels) of one base, the base's tensors, and a tokenizer."""
    from checkpoints import TINY_BERT, build_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    networks = [BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=labels)).eval() for labels in (2, 3)]
    base = {name: tensor.detach().clone() for name, tensor in networks[0].bert.state_dict().items()
            if tensor.is_floating_point()}
    vectors = []
    for seed, network in enumerate(networks, start=1):
        generator = torch.Generator().manual_seed(seed)
        network.bert.load_state_dict(networks[0].bert.state_dict())
        vectors.append({name: 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()})
    return [TaskClassifier(network, "bert.") for network in networks], base, vectors, build_tokenizer()


def _texts():
    return [TaskPrompts(["the cat sat.", "a dog", "is it so"], 2, 16) for _ in range(2)]


def test_classification_entropy_of_zero_head(bert_classifiers):
    classifiers, _, _, tokenizer = bert_classifiers
    network = classifiers[1].network
    # A zero head gives every one of the 3 labels probability 1/3, so the entropy is ln 3.
    weights = {"classifier.weight": torch.zeros_like(network.classifier.weight),
               "classifier.bias": torch.zeros_like(network.classifier.bias)}
    with torch.no_grad():
        entropy = classification_entropy(network, weights, tokenizer, ["the cat", "a dog sat."], max_length=16,
                                         device=torch.device("cpu"))
    assert entropy.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)


def test_classifier_zero_steps_keep_init(bert_classifiers):
    classifiers, base, vectors, tokenizer = bert_classifiers
    for granularity in ("task", "layer"):
        learned = learn_classifier_coefficients(classifiers, tokenizer, base, vectors, _texts(),
                                                params=_params(granularity=granularity, steps=0), seed=0,
                                                device=torch.device("cpu"))
        assert len(learned.values) == len(base)
        assert all(value == pytest.approx(0.3) for row in learned.values for value in row)
        assert learned.losses == []


def test_classifier_coefficients_move_and_clamp(bert_classifiers):
    classifiers, base, vectors, tokenizer = bert_classifiers
    learned = learn_classifier_coefficients(classifiers, tokenizer, base, vectors, _texts(),
                                            params=_params(granularity="layer", steps=3, lr=5.0), seed=0,
                                            device=torch.device("cpu"))
    values = torch.tensor(learned.values)
    assert bool((values >= 0).all())
    assert bool((values <= 1).all())
    assert not torch.allclose(values, torch.full_like(values, 0.3))
    assert len(learned.losses) == 3
    assert all(not parameter.requires_grad for c in classifiers for parameter in c.network.parameters())


def test_data_sources_read(tmp_path: Path):
    from mergekit_plus.learn.data import check_data_source, read_rows

    (tmp_path / "prompts.txt").write_text("first\n\nsecond\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.jsonl").write_text('{"prompt": "two", "answer": "2"}\n')
    (folder / "a.jsonl").write_text('{"prompt": "one"}\n')

    assert check_data_source(str(tmp_path / "prompts.txt")) is None
    assert [row["prompt"] for row in read_rows(str(tmp_path / "prompts.txt"))] == ["first", "second"]
    assert check_data_source(str(folder)) is None
    assert read_rows(str(folder)) == [{"prompt": "one"}, {"prompt": "two", "answer": "2"}]


def test_data_source_problems(tmp_path: Path):
    from mergekit_plus.learn.data import check_data_source, read_rows

    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    (tmp_path / "data.csv").write_text("prompt\nx\n")
    (tmp_path / "empty").mkdir()

    assert "not found" in check_data_source(str(tmp_path / "absent.jsonl"))
    assert "must end in .jsonl" in check_data_source(str(tmp_path / "data.csv"))
    assert "contains no *.jsonl file" in check_data_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an object with a string \"prompt\""):
        read_rows(str(tmp_path / "bad.jsonl"))


def test_task_of_model_names():
    from mergekit_plus.learn.data import task_of_model

    assert task_of_model("build/zoo/test/lm/ft-vowels", None) == "vowels"
    assert task_of_model("build/zoo/test/lm/ft-vowels/", None) == "vowels"
    assert task_of_model("org/math-sft", "math") == "math"
    assert task_of_model("org/math-sft", None) == "math-sft"
