"""CLI behaviour a mergekit user relies on: positional output, exit codes, signals, write errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from merge_helpers import invoke, message_of, write_recipe


def ties_recipe(base, fine_tunes, **extra) -> dict:
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": 1.0, "density": 0.5}} for fine_tune in fine_tunes],
    }
    recipe.update(extra)
    return recipe


def run_console_script(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mergekit_plus.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_positional_output_like_mergekit(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes))
    output = tmp_path / "merged"

    invoke(["run", recipe, output], expected_exit=0)

    assert (output / "model.safetensors").exists()


def test_two_different_outputs_rejected(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes))
    result = invoke(["run", recipe, tmp_path / "a", "--output", tmp_path / "b"], expected_exit=1)
    assert "two output folders" in message_of(result)


def test_usage_error_exits_one(tmp_path):
    completed = run_console_script("run", tmp_path / "recipe.yaml", "--no-such-option")
    assert completed.returncode == 1
    assert "No such option" in completed.stderr


def test_output_under_a_file_is_output_error(tmp_path, llama_base, llama_fine_tunes):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes))

    result = invoke(["run", recipe, blocker / "merged"], expected_exit=3)

    assert "is a file, not a folder" in message_of(result)


def test_missing_model_names_yaml_key(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, [llama_fine_tunes[0], tmp_path / "ft-missing"]))
    result = invoke(["run", recipe, tmp_path / "merged"], expected_exit=2)
    assert "models[1].model" in message_of(result)
    assert "ft-missing" in message_of(result)


def test_int8_mask_accepted_with_note(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, parameters={"int8_mask": True}))
    completed = run_console_script("run", recipe, tmp_path / "merged")
    assert completed.returncode == 0, completed.stderr
    assert "int8_mask has no effect" in completed.stderr


def test_sigterm_removes_staging_folder(tmp_path, llama_base, llama_fine_tunes):
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes))
    output = tmp_path / "merged"
    # A slow start is fine: the signal arrives while Python and torch load or while the merge runs,
    # and either way nothing may be left behind.
    process = subprocess.Popen([sys.executable, "-m", "mergekit_plus.cli", "run", str(recipe), str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and not list(tmp_path.glob(".merged.partial-*")):
        time.sleep(0.002)
    if process.poll() is not None:
        pytest.skip("the merge finished before the signal could be sent")
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=60)

    assert not list(tmp_path.glob(".merged.partial-*"))
    if process.returncode == 0:
        # The merge committed before the signal arrived: then the output must be whole.
        assert (output / "README.md").exists()
    else:
        assert not output.exists()
