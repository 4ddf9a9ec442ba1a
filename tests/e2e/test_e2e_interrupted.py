"""A merge killed part-way leaves nothing under the output name, and the next run cleans up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from merge_helpers import write_recipe
from transformers import LlamaConfig, LlamaForCausalLM

# 33 layers of seven 256×256 float32 projections (256 KB each) and two norms: about 300 tensors.
WIDE_CONFIG = dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=33,
                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**WIDE_CONFIG))
    folders = []
    for index in range(3):
        if index:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 1e-3)
        folder = root / f"model-{index}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_killed_merge_leaves_no_output(tmp_path, wide_checkpoints):
    base, first, second = wide_checkpoints
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, {
        "merge_method": "ties", "base_model": base,
        "models": [{"model": first}, {"model": second}],
        "parameters": {"density": 0.5},
        "output": {"path": output, "shard_size": "1MB"},
    })
    merge = [sys.executable, "-m", "mergekit_plus.cli", "run", str(recipe), "--quiet"]
    process = subprocess.Popen(merge, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # Kill the run as soon as its staging folder contains shard files.
    deadline = time.monotonic() + 120
    staging = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(tmp_path.glob(".merged.partial-*"))
        if found and any(found[0].glob("model-*.safetensors")):
            staging = found[0]
            break
        time.sleep(0.005)
    if staging is None:
        process.kill()
        pytest.fail(f"the merge ended before it could be interrupted (exit {process.poll()})")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert not output.exists()
    assert staging.exists()

    # The next run removes the dead run's staging folder and completes.
    completed = subprocess.run(merge, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert not staging.exists()
    assert (output / "model.safetensors.index.json").exists()
    shutil.rmtree(output)
