"""Frank-Wolfe merging: the operator, the step sizes, the oracle, and the iterations on a quadratic loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergekit_plus.learn.data import check_labelled_source, read_labelled_rows
from mergekit_plus.learn.frank_wolfe import (
    FrankWolfe,
    LabelledLoss,
    Settings,
    TaskExamples,
    answer_loss_sum,
    encode_example,
)
from mergekit_plus.methods import frank_wolfe, get_method, task_arithmetic, ties
from mergekit_plus.methods.base import MergeTarget
from mergekit_plus.methods.frank_wolfe import (
    ZERO,
    check_learning_params,
    check_params,
    cosine,
    move_toward,
    select_vertex,
    select_vertices,
    step_size,
)

DEFAULTS = {param.name: param.default for param in frank_wolfe.PARAMS if not param.per_model}
BASE = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5], dtype=torch.float64)
TASK_VECTORS = torch.tensor([
    [0.5, -0.2, 0.1, 0.0, 0.3, -0.05],
    [-0.4, -0.3, 0.05, 0.2, 0.0, 0.1],
    [0.3, 0.1, -0.6, 0.0, -0.1, 0.02],
], dtype=torch.float64)


def combine(coefficients, *, base_coefficient=None, merge_fn="task_arithmetic"):
    params = {**DEFAULTS, "base_coefficient": base_coefficient, "merge_fn": merge_fn}
    tensors = [BASE + row for row in TASK_VECTORS]
    return frank_wolfe.operator(BASE, tensors, params=params,
                                model_params=[{"coefficient": value} for value in coefficients], seeds=[],
                                compute_dtype=torch.float64)


def settings(**overrides) -> Settings:
    values = dict(variant="hard", iterations=3, step_size=0.1, merge_fn="task_arithmetic", scaling=0.3, density=0.2,
                  granularity="task", init="merge", score="cosine", selection="always")
    return Settings(**{**values, **overrides})


class MemoryInputs:
    """Base and candidates of a few named tensors, held in memory, read as new float32 tensors."""

    def __init__(self, base: dict[str, torch.Tensor], candidates: list[dict[str, torch.Tensor]]):
        self._base = base
        self._candidates = candidates
        self.names = list(base)
        self.count = len(candidates)

    def numel(self, name):
        return self._base[name].numel()

    def base(self, name):
        return self._base[name].clone().float()

    def candidate(self, index, name):
        return self._candidates[index][name].clone().float()


def quadratic_gradient(current, target):
    """The gradient of ½‖θ − target‖², summed over the tensors, for every call."""
    def gradient(task):
        return {name: current[name] - target[name] for name in current}, {"quadratic": 0.0}
    return gradient


def two_tensor_pool():
    # A zero base makes the full weights the task vectors, so the cosines below are easy to read.
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    relevant = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0, 0.0])}
    irrelevant = [{"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0, 0.0, 1.0])},
                  {"a": torch.tensor([0.0, -1.0]), "b": torch.tensor([1.0, 0.0, 0.0])}]
    return base, [relevant, *irrelevant]


def fresh_weights(base):
    return {name: torch.empty_like(tensor) for name, tensor in base.items()}


# -- the operator -----------------------------------------------------------------------------------

def test_method_is_registered():
    assert get_method("frank_wolfe") is frank_wolfe.METHOD


def test_operator_combines_models():
    expected = BASE + 0.1 * TASK_VECTORS[0] + 0.5 * TASK_VECTORS[1] + 0.2 * TASK_VECTORS[2]
    torch.testing.assert_close(combine([0.1, 0.5, 0.2]), expected)


def test_equal_coefficients_equal_task_arithmetic():
    expected = task_arithmetic.operator(BASE, [BASE + row for row in TASK_VECTORS],
                                        params={"lambda": 0.3, "normalize": False}, model_params=[{"weight": 1.0}] * 3,
                                        seeds=[], compute_dtype=torch.float64)
    torch.testing.assert_close(combine([0.3, 0.3, 0.3]), expected)


def test_base_coefficient_scales_base():
    # b θ₀ + Σ cᵢ θᵢ with b = 0.2, away from 1 − Σ cᵢ = 0.4.
    models = [BASE + row for row in TASK_VECTORS]
    expected = 0.2 * BASE + 0.1 * models[0] + 0.3 * models[1] + 0.2 * models[2]
    torch.testing.assert_close(combine([0.1, 0.3, 0.2], base_coefficient=0.2), expected)


def test_missing_coefficient_raises():
    with pytest.raises(ValueError, match="no coefficient for this tensor"):
        combine([0.1, None, 0.2])


def test_ties_returns_learned_tensor():
    learned = torch.tensor([1.5, -2.0], dtype=torch.float32)
    params = {**DEFAULTS, "merge_fn": "ties"}
    result = frank_wolfe.operator(None, [learned], params=params, model_params=[{"coefficient": None}], seeds=[],
                                  compute_dtype=torch.float64)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, learned.double())
    with pytest.raises(ValueError, match="hands the merge pass the learned tensor alone"):
        frank_wolfe.operator(BASE, [BASE], params=params, model_params=[{"coefficient": None}], seeds=[])


def test_partial_coefficients_rejected():
    problems = check_params(DEFAULTS, [{"coefficient": 0.3}, {"coefficient": None}])
    assert any("some models but not all" in problem for problem in problems)


def test_ties_with_coefficients_rejected():
    problems = check_params({**DEFAULTS, "merge_fn": "ties"}, [{"coefficient": 0.3}])
    assert any("ties is not linear" in problem for problem in problems)


def test_soft_with_ties_rejected():
    problems = check_params({**DEFAULTS, "merge_fn": "ties", "variant": "soft"}, [{"coefficient": None}])
    assert any("soft variant takes merge_fn task_arithmetic" in problem for problem in problems)


def test_varying_learning_parameter_rejected():
    targets = [MergeTarget("a", {**DEFAULTS, "scaling": 0.3}, ({"coefficient": None},), (2,)),
               MergeTarget("b", {**DEFAULTS, "scaling": 0.5}, ({"coefficient": None},), (2,))]
    problems = check_learning_params(targets)
    assert len(problems) == 1
    assert "`scaling` varies by tensor" in problems[0]


# -- the pure steps -----------------------------------------------------------------------------------

def test_hard_step_sizes():
    assert [step_size(t, eta=0.1, variant="hard") for t in range(4)] == pytest.approx([0.1, 0.2 / 3, 0.05, 0.04])


def test_soft_first_step_is_one():
    assert [step_size(t, eta=0.1, variant="soft") for t in range(3)] == pytest.approx([1.0, 0.2 / 3, 0.05])


def test_cosine_hand_case():
    assert cosine(torch.tensor([3.0, 4.0]), torch.tensor([4.0, -3.0])) == pytest.approx(0.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(2 ** -0.5)


def test_cosine_zero_gradient_is_zero():
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_oracle_task_takes_column_sum():
    # Vertex 1 has the lowest sum (-0.5), although vertex 0 wins tensor 0 and vertex 2 wins tensor 1.
    cosines = [[-0.9, -0.4, 0.5], [0.6, -0.1, -0.2]]
    assert select_vertices(cosines, granularity="task", selection="always") == [1, 1]


def test_oracle_tensor_takes_row_minimum():
    cosines = [[-0.9, -0.4, 0.5], [0.6, -0.1, -0.2]]
    assert select_vertices(cosines, granularity="tensor", selection="always") == [0, 2]


def test_oracle_skips_excluded():
    cosines = [[-0.9, -0.4, 0.5], [0.6, -0.1, -0.2]]
    assert select_vertices(cosines, granularity="tensor", selection="always", excluded=[[0], [2]]) == [1, 1]


def test_negative_selection_gives_zero():
    cosines = [[0.1, 0.3], [-0.2, 0.4]]
    assert select_vertices(cosines, granularity="tensor", selection="negative") == [ZERO, 0]
    assert select_vertex([0.0, 0.2], selection="negative") == ZERO


def test_oracle_ties_take_lowest_index():
    assert select_vertex([0.2, -0.5, -0.5]) == 1


def test_move_toward_hand_case():
    current = torch.tensor([1.0, 2.0])
    move_toward(current, [torch.tensor([3.0, 0.0])], 0.25)
    torch.testing.assert_close(current, torch.tensor([1.5, 1.5]))


def test_move_toward_zero_and_several():
    current = torch.tensor([1.0, 2.0])
    # [1, 2] + 0.5 · ((0 − [1, 2]) + ([2, 2] − [1, 2])) = [1, 2] + 0.5 · [0, −2] = [1, 1]
    move_toward(current, [None, torch.tensor([2.0, 2.0])], 0.5)
    torch.testing.assert_close(current, torch.tensor([1.0, 1.0]))


# -- the iterations ---------------------------------------------------------------------------------

def test_zero_iterations_return_initial_merge():
    base, candidates = two_tensor_pool()
    run = FrankWolfe(MemoryInputs(base, candidates), settings(iterations=0))
    current = fresh_weights(base)
    run.start(current)
    for name in base:
        expected = task_arithmetic.operator(base[name], [c[name] for c in candidates],
                                            params={"lambda": 0.3, "normalize": False},
                                            model_params=[{"weight": 1.0}] * 3, seeds=[])
        torch.testing.assert_close(current[name], expected)
    torch.testing.assert_close(run.rows["a"], torch.tensor([1 - 0.9, 0.3, 0.3, 0.3], dtype=torch.float64))


def test_base_init_starts_at_base():
    base, candidates = two_tensor_pool()
    base = {name: tensor + 1.0 for name, tensor in base.items()}
    run = FrankWolfe(MemoryInputs(base, candidates), settings(init="base"))
    current = fresh_weights(base)
    run.start(current)
    for name in base:
        torch.testing.assert_close(current[name], base[name])


def test_irrelevant_candidates_never_picked():
    base, candidates = two_tensor_pool()
    current = fresh_weights(base)
    run = FrankWolfe(MemoryInputs(base, candidates), settings(iterations=5, step_size=0.5, scaling=1.0))
    run.start(current)
    gradient = quadratic_gradient(current, candidates[0])
    distances = []
    for iteration in range(5):
        distances.append(sum(float((current[n] - candidates[0][n]).norm() ** 2) for n in base))
        run.iterate(iteration, current, gradient, ["quadratic"])
    assert [record.picks[0][0] for record in run.records] == [0] * 5
    assert all(later < earlier for earlier, later in zip(distances, distances[1:]))


@pytest.mark.parametrize("overrides", [
    {},
    {"granularity": "tensor"},
    {"granularity": "tensor", "selection": "negative"},
    {"variant": "soft", "init": "base"},
    {"variant": "soft", "granularity": "tensor", "init": "merge"},
], ids=["task", "tensor", "tensor-negative", "soft", "soft-tensor"])
def test_coefficients_match_direct_update(overrides):
    torch.manual_seed(0)
    names = {"a": (3, 4), "b": (5,)}
    base = {name: torch.randn(shape) for name, shape in names.items()}
    candidates = [{name: base[name] + torch.randn(shape) for name, shape in names.items()} for _ in range(3)]
    target = {name: torch.randn(shape) for name, shape in names.items()}
    current = fresh_weights(base)
    run = FrankWolfe(MemoryInputs(base, candidates), settings(iterations=4, step_size=0.8, scaling=0.5, **overrides))
    run.start(current)
    gradient = quadratic_gradient(current, target)
    for iteration in range(4):
        run.iterate(iteration, current, gradient, ["first", "second"])

    for name in names:
        row = run.rows[name]
        replayed = row[0] * base[name].double() + sum(row[i + 1] * candidates[i][name].double() for i in range(3))
        torch.testing.assert_close(current[name].double(), replayed, rtol=1e-5, atol=1e-5)
    if overrides.get("selection") == "negative":
        assert any(ZERO in pick for record in run.records for pick in record.picks)


def test_soft_picks_distinct_candidates():
    base, candidates = two_tensor_pool()
    current = fresh_weights(base)
    run = FrankWolfe(MemoryInputs(base, candidates), settings(variant="soft", init="base", iterations=1))
    run.start(current)
    run.iterate(0, current, quadratic_gradient(current, candidates[0]), ["x", "y", "z", "w"])
    picks = [pick[0] for pick in run.records[0].picks]
    # One pick per task, each barred from the earlier ones, until the three candidates are used up.
    assert sorted(picks) == [0, 1, 2]
    assert picks[0] == 0


def test_ties_step_trims_difference():
    # One tensor of 4 entries, base init: θ⁽⁰⁾ = θ₀ = 0, then one step toward the only candidate.
    base = {"w": torch.zeros(4)}
    candidate = {"w": torch.tensor([4.0, -3.0, 0.5, 0.1])}
    current = fresh_weights(base)
    run = FrankWolfe(MemoryInputs(base, [candidate]),
                     settings(merge_fn="ties", init="base", density=0.5, step_size=1.0, scaling=0.5))
    run.start(current)
    run.iterate(0, current, quadratic_gradient(current, {"w": torch.tensor([4.0, -3.0, 0.0, 0.0])}), ["t"])
    # γ = 1, λ = 0.5; the trim keeps ⌊0.5 · 4⌋ + 1 = 3 entries of s − θ: 4, −3 and 0.5.
    torch.testing.assert_close(current["w"], torch.tensor([2.0, -1.5, 0.25, 0.0]))


def test_ties_initial_merge_equals_ties():
    base, candidates = two_tensor_pool()
    current = fresh_weights(base)
    run = FrankWolfe(MemoryInputs(base, candidates), settings(merge_fn="ties", iterations=0, density=0.5))
    run.start(current)
    thresholds = run._initial_thresholds
    for name in base:
        expected = ties.operator(base[name], [c[name] for c in candidates],
                                 params={"lambda": 0.3, "normalize": False, "sign_election": "trimmed",
                                         "scope": "model"},
                                 model_params=[{"weight": 1.0, "density": 0.5}] * 3, seeds=[],
                                 statistics=thresholds)
        torch.testing.assert_close(current[name], expected)


# -- the labelled loss ----------------------------------------------------------------------------------

def test_labelled_row_without_answer(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "ab", "answer": "b"}\n\n{"prompt": "cd"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: the row has no \"answer\""):
        read_labelled_rows(str(path))


def test_text_file_is_not_labelled(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    assert "contains prompts only" in check_labelled_source(str(path))


def test_labelled_rows_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "ab", "answer": "b"}, {"prompt": "cd", "answer": "d"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_labelled_rows(str(path)) == rows
    assert check_labelled_source(str(path)) is None


@pytest.fixture(scope="module")
def tiny_lm(llama_base: Path):
    from transformers import AutoTokenizer

    from mergekit_plus.zoo.evaluate import load_causal_lm

    return load_causal_lm(llama_base), AutoTokenizer.from_pretrained(llama_base)


def test_encode_example_appends_eos(tiny_lm):
    _, tokenizer = tiny_lm
    prompt_ids, answer_ids = encode_example(tokenizer, "abc", "de", max_length=3)
    assert prompt_ids == tokenizer("abc")["input_ids"][-3:]
    assert answer_ids == [*tokenizer("de", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def test_answer_loss_ignores_padding(tiny_lm):
    network, tokenizer = tiny_lm
    examples = [encode_example(tokenizer, prompt, answer, max_length=16)
                for prompt, answer in [("a cat", "sat"), ("the dog ran far", "x"), ("hi", "there you")]]
    with torch.no_grad():
        together = answer_loss_sum(network, examples, pad_id=0, device=torch.device("cpu"))
        alone = sum(answer_loss_sum(network, [example], pad_id=0, device=torch.device("cpu")) for example in examples)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_gradient_independent_of_batch_size(tiny_lm):
    network, tokenizer = tiny_lm
    network.requires_grad_(True)
    tensors = dict(network.named_parameters())
    examples = [encode_example(tokenizer, prompt, "ab", max_length=16) for prompt in ["xyz", "hello there", "q"]]
    gradients = []
    for batch_size in (1, 3):
        loss = LabelledLoss(network, tensors, {"t": TaskExamples(examples, batch_size)}, pad_id=0,
                            device=torch.device("cpu"))
        gradient, losses = loss.gradient(None)
        gradients.append({name: tensor.clone() for name, tensor in gradient.items()})
        assert losses["t"] > 0
    for name in tensors:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-6)
