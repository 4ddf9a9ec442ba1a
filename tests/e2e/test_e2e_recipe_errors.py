"""Invalid recipes: exit code 1, every problem with its line, and suggestions for misspelled keys.

The recipes are written as text, so the line numbers in the assertions are the lines below.
"""

from __future__ import annotations

from pathlib import Path

from merge_helpers import assert_mentions, invoke, message_of


def line_pattern(number: int) -> str:
    """Return a regex for a YAML location such as "line 7" or "recipe.yaml:7"."""
    return rf"(line\s*{number}\b|\.yaml:{number}\b)"


def write_text_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def test_misspelled_key_suggests_name(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_text_recipe(
        tmp_path,
        f"""\
merge_method: linear
models:
  - model: {llama_base}
    parameters:
      weight: 0.5
  - model: {llama_fine_tunes[0]}
    parameters:
      weight: 0.5
parameters:
  normalise: true
output:
  path: {tmp_path / "merged"}
""",
    )

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"normalise", r"normalize", line_pattern(10))
    assert not (tmp_path / "merged").exists()


def test_key_at_wrong_level(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_text_recipe(
        tmp_path,
        f"""\
merge_method: linear
models:
  - model: {llama_base}
    weight: 0.5
  - model: {llama_fine_tunes[0]}
    parameters:
      weight: 0.5
output:
  path: {tmp_path / "merged"}
""",
    )

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"\bweight\b", line_pattern(4), r"\bparameters\b")
    assert not (tmp_path / "merged").exists()


def test_all_problems_reported_together(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_text_recipe(
        tmp_path,
        f"""\
merge_method: ties
base_model: {llama_base}
models:
  - model: {llama_fine_tunes[0]}
    parameters:
      weight: 1.0
      density: 1.5
parameters:
  lamda: 1.0
  sign_election: majority
seed: zero
output:
  path: {tmp_path / "merged"}
""",
    )

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    message = message_of(result)
    assert_mentions(message, r"density", r"1\.5", line_pattern(7))
    assert_mentions(message, r"lamda", r"\blambda\b", line_pattern(9))
    assert_mentions(message, r"sign_election", r"majority", r"trimmed", r"weighted", line_pattern(10))
    assert_mentions(message, r"\bseed\b", line_pattern(11))
    assert not (tmp_path / "merged").exists()


def test_misspelled_method_suggests_name(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_text_recipe(
        tmp_path,
        f"""\
merge_method: task_arithmatic
base_model: {llama_base}
models:
  - model: {llama_fine_tunes[0]}
output:
  path: {tmp_path / "merged"}
""",
    )

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"task_arithmatic", r"\btask_arithmetic\b", line_pattern(1))


def test_validate_reports_recipe_problems(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_text_recipe(
        tmp_path,
        f"""\
merge_method: linear
models:
  - model: {llama_base}
  - model: {llama_fine_tunes[0]}
parameters:
  normalise: true
""",
    )

    result = invoke(["validate", recipe], expected_exit=1)

    assert_mentions(message_of(result), r"normalise", r"normalize", line_pattern(6))


def test_yaml_syntax_error_has_line(tmp_path):
    recipe = write_text_recipe(tmp_path, "merge_method: linear\nmodels:\n  - model: [unclosed\n")

    result = invoke(["run", recipe, "--quiet"], expected_exit=1)

    assert_mentions(message_of(result), r"line\s*\d+|\.yaml:\d+")
    assert "Traceback" not in result.output

