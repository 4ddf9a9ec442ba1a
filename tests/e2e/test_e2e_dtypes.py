"""Stored dtypes of the output, and values that the output dtype cannot hold."""

from __future__ import annotations

import json
import re

import torch
from merge_helpers import (
    assert_mentions,
    header_dtypes,
    invoke,
    load_and_generate,
    message_of,
    read_tensors,
    write_recipe,
)

FLOAT16_MAX = 65504.0
LARGE_NORM_VALUE = 99840.0  # 1e5 rounded to bfloat16


def config_dtype(folder) -> str:
    config = json.loads((folder / "config.json").read_text())
    if "torch_dtype" in config:
        # transformers 5 writes `dtype`; an older key left beside it must agree.
        assert config["torch_dtype"] == config.get("dtype", config["torch_dtype"])
    return config.get("dtype", config.get("torch_dtype"))


def test_bf16_inputs_stored_as_float16(tmp_path, llama_base_bf16, llama_fine_tune_bf16):
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": llama_base_bf16,
            "models": [{"model": llama_fine_tune_bf16, "parameters": {"weight": 0.5}}],
            "out_dtype": "float16",
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    dtypes = header_dtypes(output)
    assert dtypes
    assert {name: dtype for name, dtype in dtypes.items() if dtype != "F16"} == {}
    assert config_dtype(output) == "float16"
    assert load_and_generate(output).dtype == torch.float16


def test_mixed_dtypes_follow_base(tmp_path, llama_base_bf16, llama_fine_tune_fp16):
    """Without out_dtype, a bfloat16 base and a float16 fine-tune give a bfloat16 merge."""
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": llama_base_bf16,
            "models": [{"model": llama_fine_tune_fp16, "parameters": {"weight": 0.5}}],
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    assert set(header_dtypes(output).values()) == {"BF16"}
    assert config_dtype(output) == "bfloat16"
    load_and_generate(output)


def test_mixed_dtypes_follow_first_model(tmp_path, llama_base_bf16, llama_fine_tune_fp16):
    """Without a base and without out_dtype, the first model's dtype (float16 here) is stored."""
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": llama_fine_tune_fp16, "parameters": {"weight": 0.5}},
                {"model": llama_base_bf16, "parameters": {"weight": 0.5}},
            ],
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    assert set(header_dtypes(output).values()) == {"F16"}
    assert config_dtype(output) == "float16"
    load_and_generate(output)


def large_norm_recipe(base, large, output, *, clamp: bool | None = None) -> dict:
    """task_arithmetic with weight 1 gives the large model's 99840 at `EDITED_NORM`[3]."""
    output_section = {"path": output}
    if clamp is not None:
        output_section["clamp_out_of_range"] = clamp
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": large, "parameters": {"weight": 1.0}}],
        "out_dtype": "float16",
        "output": output_section,
    }


def mentions_magnitude(text: str, expected: float) -> bool:
    """Return whether a number within 1% of `expected` appears in `text` (1e5, 99840, 9.98e+04, ...)."""
    for token in re.findall(r"\d[\d,_]*(?:\.\d+)?(?:e[+-]?\d+)?", text, flags=re.IGNORECASE):
        try:
            value = float(token.replace(",", "").replace("_", ""))
        except ValueError:
            continue
        if abs(value - expected) <= 0.01 * expected:
            return True
    return False


def test_float16_overflow_names_tensor(tmp_path, llama_base_bf16, llama_bf16_large_norm):
    import checkpoints

    output = tmp_path / "out" / "merged"
    output.parent.mkdir()
    recipe = write_recipe(tmp_path, large_norm_recipe(llama_base_bf16, llama_bf16_large_norm, output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=4)

    message = message_of(result)
    assert_mentions(message, re.escape(checkpoints.EDITED_NORM), r"float16")
    assert mentions_magnitude(message, LARGE_NORM_VALUE), message
    assert list(output.parent.iterdir()) == []


def test_float16_overflow_clamped(tmp_path, llama_base_bf16, llama_bf16_large_norm):
    import checkpoints

    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path, large_norm_recipe(llama_base_bf16, llama_bf16_large_norm, output, clamp=True)
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    norm = read_tensors(output)[checkpoints.EDITED_NORM]
    assert norm.dtype == torch.float16
    assert norm[3].item() == FLOAT16_MAX
    assert torch.isfinite(norm).all()
    load_and_generate(output)


def test_nan_input_reported(tmp_path, llama_base, llama_fine_tune_nan):
    import checkpoints

    output = tmp_path / "out" / "merged"
    output.parent.mkdir()
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": llama_base,
            "models": [{"model": llama_fine_tune_nan, "parameters": {"weight": 0.5}}],
            "output": {"path": output},
        },
    )

    result = invoke(["run", recipe, "--quiet"], expected_exit=4)

    assert_mentions(message_of(result), re.escape(checkpoints.EDITED_NORM), r"\bnan\b")
    assert list(output.parent.iterdir()) == []
