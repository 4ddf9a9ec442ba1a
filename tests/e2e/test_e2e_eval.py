"""`merge eval` on the test zoo: a fine-tune scores far above the base on its own task."""

from __future__ import annotations

import json
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
