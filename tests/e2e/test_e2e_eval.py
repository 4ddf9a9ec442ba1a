"""`merge eval` on the test zoo: a fine-tune scores far above the base on its own task."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from merge_helpers import invoke, message_of


def manifest_family(zoo: Path) -> dict:
    return json.loads((zoo / "zoo.json").read_text())["families"]["lm"]


def test_eval_fine_tune_above_base(test_zoo):
    family = manifest_family(test_zoo)
    task = "last_two"
    fine_tune = json.loads(invoke(["eval", test_zoo / family["fine_tunes"][task], "--tasks", task,
                                   "--zoo", test_zoo, "--json"], expected_exit=0).stdout)
    base = json.loads(invoke(["eval", test_zoo / family["base"], "--tasks", task, "--zoo", test_zoo, "--json"],
                             expected_exit=0).stdout)
    assert fine_tune["tasks"][task]["accuracy"] >= base["tasks"][task]["accuracy"] + 0.3
    assert fine_tune["tasks"][task]["normalized"] == 1.0
    assert base["family"] == "lm"


def test_eval_table_lists_every_task(test_zoo):
    family = manifest_family(test_zoo)
    text = invoke(["eval", test_zoo / family["base"], "--zoo", test_zoo], expected_exit=0).stdout
    for task in family["tasks"]:
        assert task in text
    assert "average" in text


def test_eval_lora_adapter(test_zoo):
    lora = manifest_family(test_zoo)["lora"]
    report = json.loads(invoke(["eval", test_zoo / lora["checkpoints"][-1], "--tasks", lora["task"],
                                "--zoo", test_zoo, "--json"], expected_exit=0).stdout)
    assert abs(report["tasks"][lora["task"]]["accuracy"] - lora["final_accuracy"]) < 1e-9


def test_eval_unknown_task_rejected(test_zoo):
    family = manifest_family(test_zoo)
    result = invoke(["eval", test_zoo / family["base"], "--tasks", "nope", "--zoo", test_zoo], expected_exit=2)
    assert "unknown task 'nope'" in message_of(result)


def test_eval_missing_zoo_explains(tmp_path, test_zoo):
    family = manifest_family(test_zoo)
    result = invoke(["eval", test_zoo / family["base"], "--zoo", tmp_path / "none"], expected_exit=2)
    text = message_of(result)
    assert "no zoo at" in text
    assert "merge zoo build" in text


def test_zoo_build_unknown_size():
    completed = subprocess.run([sys.executable, "-m", "mergekit_plus.cli", "zoo", "build", "--size", "huge"],
                               capture_output=True, text=True)
    assert completed.returncode == 1
    assert "unknown size 'huge'" in " ".join(completed.stderr.split())


def test_eval_empty_task_list(test_zoo):
    family = manifest_family(test_zoo)
    result = invoke(["eval", test_zoo / family["base"], "--tasks", "", "--zoo", test_zoo], expected_exit=2)
    assert "no task selected" in message_of(result)


def test_eval_incomplete_checkpoint(test_zoo, tmp_path):
    """transformers would fill missing tensors with random values; eval must refuse to score them."""
    from safetensors.torch import load_file, save_file

    family = manifest_family(test_zoo)
    source = test_zoo / family["base"]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    text = message_of(invoke(["eval", broken, "--zoo", test_zoo], expected_exit=2))
    assert "lacks 1 tensor(s)" in text
    assert "model.layers.1.mlp.down_proj.weight" in text


def test_eval_folder_without_weights(test_zoo, tmp_path):
    family = manifest_family(test_zoo)
    (tmp_path / "empty").mkdir()
    shutil.copy(test_zoo / family["base"] / "config.json", tmp_path / "empty")
    text = message_of(invoke(["eval", tmp_path / "empty", "--zoo", test_zoo], expected_exit=2))
    assert "cannot load" in text


def test_eval_zoo_subfolder_hint(test_zoo):
    family = manifest_family(test_zoo)
    text = message_of(invoke(["eval", test_zoo / family["base"], "--zoo", test_zoo / "lm"], expected_exit=2))
    assert f"--zoo {test_zoo}" in text
