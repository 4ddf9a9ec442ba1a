"""Recipe validation: every problem reported at once, with its YAML line and a fix."""

from __future__ import annotations

import pytest

from mergekit_plus.errors import RecipeError
from mergekit_plus.recipe.validate import parse_recipe
from mergekit_plus.recipe.yaml_lines import load_located_yaml


def parse(text: str):
    return parse_recipe(load_located_yaml(text, source="recipe.yaml"))


def problems_of(text: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse(text)
    return caught.value.problems


VALID = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1.0, density: 0.5}
  - model: b
parameters:
  normalize: true
"""


def test_valid_recipe_parses():
    recipe = parse(VALID)
    assert recipe.merge_method == "ties"
    assert recipe.base_model.model == "base"
    assert recipe.models[0].parameters == {"weight": 1.0, "density": 0.5}
    assert recipe.dtype == "float32"
    assert recipe.out_dtype is None
    assert recipe.shard_size_bytes == 5 * 10**9


def test_misspelled_parameter_names_line_and_fix():
    text = VALID.replace("  normalize: true", "  normalise: true")
    [problem] = problems_of(text)
    assert "line 8" in problem
    assert "normalise" in problem
    assert "did you mean `normalize`" in problem


def test_weight_at_model_level_is_rejected():
    text = """\
merge_method: linear
models:
  - model: a
    weight: 0.5
  - model: b
    parameters:
    weight: 0.5
"""
    problems = problems_of(text)
    assert len(problems) == 2
    assert "models[0].weight (line 4)" in problems[0]
    assert "move it under `parameters:`" in problems[0]
    assert "models[1].weight (line 7)" in problems[1]


def test_all_problems_reported_together():
    text = """\
merge_method: ties
models:
  - model: a
    parameters: {densty: 0.5, weight: abc}
parameters:
  lambda: 1.0
outptu: x
"""
    problems = problems_of(text)
    joined = "\n".join(problems)
    assert "needs `base_model`" in joined
    assert "did you mean `density`" in joined
    assert "`weight` must be a number" in joined
    assert "did you mean `output`" in joined
    assert "line 7" in joined


def test_unknown_method_suggests_closest():
    [problem] = problems_of("merge_method: tie\nmodels: [{model: a}]\n")
    assert "unknown merge method `tie`" in problem
    assert "did you mean `ties`" in problem


def test_global_parameter_in_model_is_rejected():
    text = VALID.replace("{weight: 1.0, density: 0.5}", "{lambda: 0.5}")
    [problem] = problems_of(text)
    assert "`lambda` is a global parameter" in problem
    assert "line 5" in problem


def test_duplicate_key_is_rejected():
    [problem] = problems_of(VALID + "parameters:\n  lambda: 2\n")
    assert "duplicate key `parameters`" in problem
    assert "line 7" in problem


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("density: 1.5", "at most 1"),
        ("density: -0.1", "at least 0"),
        ("sign_election: weighed", "did you mean `weighted`"),
        ("normalize: 3", "true or false"),
        ("density: []", "empty list"),
        ("density: [{filter: mlp}]", "has no `value`"),
        ("density: [{filtr: mlp, value: 0.5}]", "did you mean `filter`"),
    ],
)
def test_parameter_values_checked(value, expected):
    text = VALID.replace("  normalize: true", f"  {value}")
    problems = problems_of(text)
    assert any(expected in problem for problem in problems), problems


def test_gradient_and_filter_forms_accepted():
    text = VALID.replace("  normalize: true", "  density: [{filter: mlp, value: [0.1, 0.9]}, {value: 0.5}]")
    recipe = parse(text)
    assert recipe.parameters["density"][1] == {"value": 0.5}


def test_unsupported_mergekit_key_explained():
    problems = problems_of(VALID + "slices: []\n")
    assert any("`slices` is not supported" in problem for problem in problems)


def test_tokenizer_source_must_be_an_input():
    problems = problems_of(VALID + "tokenizer:\n  source: c\n")
    assert any("tokenizer source `c` is not an input" in problem for problem in problems)


def test_yaml_syntax_error_has_position():
    [problem] = problems_of("merge_method: ties\nmodels: [\n")
    assert "invalid YAML" in problem
    assert "line" in problem


def test_shard_size_and_dtype_aliases():
    recipe = parse(VALID + "dtype: bf16\nout_dtype: fp16\noutput: {path: out, shard_size: 2GiB}\n")
    assert recipe.dtype == "bfloat16"
    assert recipe.out_dtype == "float16"
    assert recipe.shard_size_bytes == 2 * 2**30


def test_bad_shard_size_rejected():
    problems = problems_of(VALID + "output: {path: out, shard_size: 2 gigs}\n")
    assert any("size such as" in problem for problem in problems)
