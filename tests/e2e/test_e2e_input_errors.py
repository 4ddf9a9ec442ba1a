"""Inputs that `merge` must reject with exit code 2 before it writes anything."""

from __future__ import annotations

import re

import pytest
from merge_helpers import (
    assert_mentions,
    invoke,
    message_of,
    shape_pattern,
    write_recipe,
)

BROKEN_CAUSES = {
    "missing": r"missing|not found|does not exist|no such file",
    "lfs-pointer": r"\blfs\b",
    "truncated": r"truncated|incomplete|shorter|expected \d+ bytes",
}


def task_arithmetic_recipe(base, fine_tunes, output) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": 0.5}} for fine_tune in fine_tunes],
        "output": {"path": output},
    }


def output_in_empty_folder(tmp_path):
    """Return an output path inside an empty folder, so that a leftover temporary folder shows."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "merged"


def test_vocab_mismatch_rejected_before_output(tmp_path, llama_base, llama_fine_tunes, llama_resized_vocab):
    output = output_in_empty_folder(tmp_path)
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, [llama_fine_tunes[0], llama_resized_vocab], output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    message = message_of(result)
    assert_mentions(
        message,
        r"model\.embed_tokens\.weight|lm_head\.weight",
        shape_pattern(34, 32),
        shape_pattern(32, 32),
        re.escape(llama_resized_vocab.name),
        re.escape(llama_base.name),
        r"vocab",
    )
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("cause", sorted(BROKEN_CAUSES))
def test_broken_shard_rejected(cause, tmp_path, broken_sharded_checkpoints, llama_fine_tunes):
    folder, bad_shard = broken_sharded_checkpoints[cause]
    output = output_in_empty_folder(tmp_path)
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(folder, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    assert_mentions(message_of(result), re.escape(bad_shard.name), BROKEN_CAUSES[cause])
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("cause", sorted(BROKEN_CAUSES))
def test_validate_finds_broken_shard(cause, tmp_path, broken_sharded_checkpoints, llama_fine_tunes):
    folder, bad_shard = broken_sharded_checkpoints[cause]
    output = output_in_empty_folder(tmp_path)
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(folder, llama_fine_tunes, output))

    result = invoke(["validate", recipe], expected_exit=2)

    assert_mentions(message_of(result), re.escape(bad_shard.name), BROKEN_CAUSES[cause])
    assert list(output.parent.iterdir()) == []


def test_missing_model_folder_rejected(tmp_path, llama_base):
    output = output_in_empty_folder(tmp_path)
    absent = tmp_path / "no-such-model"
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, [absent], output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    assert_mentions(message_of(result), re.escape(absent.name))
    assert list(output.parent.iterdir()) == []


def test_transposed_shapes_rejected(tmp_path, transposed_probe_pair):
    import checkpoints

    base, fine_tune = transposed_probe_pair
    output = output_in_empty_folder(tmp_path)
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(base, [fine_tune], output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    assert_mentions(
        message_of(result),
        re.escape(checkpoints.PROBE_TENSOR),
        shape_pattern(1, 8),
        shape_pattern(8, 1),
    )
    assert list(output.parent.iterdir()) == []


QUANTIZED_EVIDENCE = {
    "llama_quantization_config": r"quantization_config",
    "llama_int8_weights": r"\bint8\b",
    "llama_int8_weights_with_scales": r"\bint8\b|weight_scale",
}


@pytest.mark.parametrize("fixture_name", sorted(QUANTIZED_EVIDENCE))
def test_quantized_input_rejected(fixture_name, request, tmp_path, llama_base):
    quantized = request.getfixturevalue(fixture_name)
    output = output_in_empty_folder(tmp_path)
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, [quantized], output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=2)

    assert_mentions(message_of(result), r"quantized", re.escape(quantized.name), QUANTIZED_EVIDENCE[fixture_name])
    assert list(output.parent.iterdir()) == []
