"""The causal-LM family of the zoo: it builds, loads in transformers and peft, and rebuilds identically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_plus.zoo.build import LM_SIZES, ZooSettings, build_zoo, settings_for

MICRO = dataclasses.replace(
    settings_for("test").lm, tasks=("last_two", "sort"), hidden_size=32, layers=1, intermediate_size=64,
    base_steps=4, fine_tune_steps=3, lora_steps=4, lora_save_every=2, moe_steps=3, batch_size=8,
    eval_examples=16, calibration_examples=8, train_examples=8,
)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_zoo_manifest_lists_checkpoints(test_zoo):
    manifest = json.loads((test_zoo / "zoo.json").read_text())
    family = manifest["families"]["lm"]
    assert manifest["size"] == "test"
    assert len(family["tasks"]) >= 4
    assert set(family["fine_tunes"]) == set(family["tasks"])
    for relative in [family["base"], family["moe"], *family["fine_tunes"].values(), *family["lora"]["checkpoints"]]:
        assert (test_zoo / relative).is_dir(), relative


def test_zoo_checkpoints_load(test_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = json.loads((test_zoo / "zoo.json").read_text())["families"]["lm"]
    for relative in [family["base"], *family["fine_tunes"].values()]:
        model, info = AutoModelForCausalLM.from_pretrained(test_zoo / relative, output_loading_info=True)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not info["missing_keys"]
        assert not info["unexpected_keys"]
        tokenizer = AutoTokenizer.from_pretrained(test_zoo / relative)
        assert tokenizer.decode(tokenizer("Fab>")["input_ids"], skip_special_tokens=True) == "Fab>"


def test_zoo_moe_has_eight_experts(test_zoo):
    from transformers import AutoModelForCausalLM

    family = json.loads((test_zoo / "zoo.json").read_text())["families"]["lm"]
    model = AutoModelForCausalLM.from_pretrained(test_zoo / family["moe"])
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 8
    assert model.config.num_experts_per_tok == 2


def test_zoo_lora_checkpoints_have_losses(test_zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = json.loads((test_zoo / "zoo.json").read_text())["families"]["lm"]["lora"]
    steps = []
    for relative in lora["checkpoints"]:
        state = json.loads((test_zoo / relative / "trainer_state.json").read_text())
        steps.append(state["global_step"])
        assert state["log_history"][-1]["step"] == state["global_step"]
        assert all(entry["loss"] > 0 for entry in state["log_history"])
    assert steps == sorted(steps)
    assert len(steps) >= 3
    base = AutoModelForCausalLM.from_pretrained(test_zoo / lora["base"])
    adapter = PeftModel.from_pretrained(base, test_zoo / lora["checkpoints"][-1])
    assert adapter.peft_config["default"].r > 0


def test_fine_tunes_beat_base(test_zoo):
    accuracy = json.loads((test_zoo / "zoo.json").read_text())["families"]["lm"]["accuracy"]
    for task, score in accuracy["fine_tunes"].items():
        assert score > accuracy["base"][task], task


def test_zoo_build_reuses_cache(test_zoo):
    settings = settings_for("test")
    folder, manifest, built = build_zoo(settings, test_zoo)
    assert folder == test_zoo
    assert not built
    assert manifest["settings_hash"] == settings.digest()


def test_bench_zoo_has_six_tasks():
    assert len(LM_SIZES["bench"].tasks) >= 6


def test_zoo_settings_change_digest():
    settings = settings_for("test")
    changed = dataclasses.replace(settings, lm=dataclasses.replace(settings.lm, fine_tune_lr=1e-5))
    assert changed.digest() != settings.digest()


BUILD_IN_SUBPROCESS = """
import json, sys
from pathlib import Path
from mergekit_plus.zoo.build import ZooSettings, build_zoo
from mergekit_plus.zoo.lm import LMSettings
values = json.loads(sys.argv[1])
values["tasks"] = tuple(values["tasks"])
build_zoo(ZooSettings(size="test", lm=LMSettings(**values), encoder=None, threads=1), Path(sys.argv[2]))
"""


def test_zoo_build_deterministic(tmp_path):
    """A second build in another process, with another string-hash seed, writes the same bytes."""
    settings = ZooSettings(size="test", lm=MICRO, encoder=None, threads=1)
    first, _, _ = build_zoo(settings, tmp_path / "first")
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", BUILD_IN_SUBPROCESS, json.dumps(MICRO.to_dict()),
                    str(tmp_path / "second")], check=True, env=environment, capture_output=True)
    digests = tree_digest(first)
    assert any(name.endswith("model.safetensors") for name in digests)
    assert any(name.endswith("adapter_config.json") for name in digests)
    assert digests == tree_digest(tmp_path / "second")


def test_zoo_build_removes_killed_staging(tmp_path):
    settings = ZooSettings(size="test", lm=MICRO, encoder=None, threads=1)
    # A PID above the kernel's maximum (4,194,304 on Linux) never belongs to a running process.
    abandoned = tmp_path / ".zoo.partial-99999999"
    (abandoned / "lm").mkdir(parents=True)
    build_zoo(settings, tmp_path / "zoo")
    assert not abandoned.exists()
    assert (tmp_path / "zoo" / "zoo.json").is_file()


def test_zoo_build_rejects_other_folder(tmp_path):
    from mergekit_plus.errors import OutputError

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    settings = ZooSettings(size="test", lm=MICRO, encoder=None, threads=1)
    with pytest.raises(OutputError, match="is not a zoo folder"):
        build_zoo(settings, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
