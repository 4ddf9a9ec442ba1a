"""The pure parts of the FusionBench comparison in benchmarks/: recipe mapping, watchdog, table, cut-offs.

Nothing here installs or imports fusion_bench. The watchdog test starts one small Python process
that allocates up to 1 GB and is stopped near 0.2 GB.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while the class bodies run.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fusionbench_ties = _load("fusionbench_ties")
bench = _load("bench")
compare_outputs = _load("compare_outputs")

MODEL_SCOPE_RECIPE = yaml.safe_load((BENCH_DIR / "ties-model-scope.yml").read_text())


# fusionbench_settings


def test_settings_of_model_scope_recipe():
    settings = fusionbench_ties.fusionbench_settings(MODEL_SCOPE_RECIPE)
    assert settings["models"] == {
        "_pretrained_": "./ckpt/base",
        "model_1": "./ckpt/ft1",
        "model_2": "./ckpt/ft2",
        "model_3": "./ckpt/ft3",
    }
    assert settings["torch_dtype"] == "float32"
    assert settings["model_dtype"] == "bfloat16"
    assert settings["algorithm"] == {"scaling_factor": 1.0, "threshold": 0.2, "remove_keys": [], "merge_func": "mean"}


def test_settings_normalize_false_sums():
    recipe = copy.deepcopy(MODEL_SCOPE_RECIPE)
    recipe["parameters"]["normalize"] = False
    assert fusionbench_ties.fusionbench_settings(recipe)["algorithm"]["merge_func"] == "sum"


def test_settings_reject_tensor_scope():
    recipe = copy.deepcopy(MODEL_SCOPE_RECIPE)
    recipe["parameters"]["scope"] = "tensor"
    with pytest.raises(ValueError, match=r"parameters\.scope must be 'model'"):
        fusionbench_ties.fusionbench_settings(recipe)


def test_settings_list_every_problem():
    recipe = copy.deepcopy(MODEL_SCOPE_RECIPE)
    recipe["models"][0]["parameters"]["weight"] = 0.5
    recipe["models"][1]["parameters"]["density"] = 0.3
    recipe["parameters"]["sign_election"] = "weighted"
    recipe["tokenizer"] = {"source": "union"}
    with pytest.raises(ValueError) as raised:
        fusionbench_ties.fusionbench_settings(recipe)
    message = str(raised.value)
    assert r"models[0].parameters.weight must be 1.0" in message
    assert "every model needs the same density" in message
    assert "parameters.sign_election must be 'trimmed'" in message
    assert "top-level key 'tokenizer'" in message


# watchdog and table


def test_watchdog_stops_run_at_cap(tmp_path):
    # Allocates 50 MB every 20 ms up to 1 GB, far past the 0.2 GB cap, then waits to be killed.
    grow = ("import time\nblocks = []\nfor _ in range(20):\n    blocks.append(bytearray(50 << 20))\n"
            "    time.sleep(0.02)\ntime.sleep(60)\n")
    result = bench.run_measured("grow", 0, [sys.executable, "-c", grow], cwd=tmp_path, env={},
                                cap_bytes=200_000_000)
    assert result.stopped == "cap"
    assert result.returncode == -9
    assert result.peak_rss_bytes > 200_000_000
    assert result.peak_rss_bytes < 1_100_000_000
    assert result.wall_s < 30


def test_watchdog_leaves_small_run_alone(tmp_path):
    result = bench.run_measured("small", 0, [sys.executable, "-c", "pass"], cwd=tmp_path, env={},
                                cap_bytes=2_000_000_000)
    assert result.stopped is None
    assert result.returncode == 0


def _summary(tool: str, wall_s: float | None, peak_gb: float, stopped: str | None = None):
    run = bench.RunResult(tool=tool, round=0, wall_s=wall_s or 30.0, peak_rss_bytes=int(peak_gb * 1e9),
                          ru_maxrss_bytes=0, sampled_peak_rss_bytes=0, sampled_anon_at_peak_bytes=0,
                          sampled_file_at_peak_bytes=0, returncode=-9 if stopped else 0, cpu_s=12.0,
                          stopped=stopped)
    return bench.Summary(tool, wall_s, int(peak_gb * 1e9), stopped=stopped, runs=[run])


def test_table_shows_stopped_tool():
    summaries = {
        "ours-model-scope": _summary("ours-model-scope", 10.0, 0.9),
        "fusionbench": _summary("fusionbench", None, 8.0, stopped="cap"),
    }
    lines = bench.format_table(summaries).splitlines()
    assert lines[3] == "| fusionbench | stopped at 8.0 GB (cap) | > 8.00 | 12.0 until stopped | 1 | 0 |"
    assert lines[4] == "| ours-model-scope / fusionbench | - | < 0.11x | | | |"


def test_table_ratio_of_finished_tools():
    summaries = {
        "ours-model-scope": _summary("ours-model-scope", 4.0, 0.5),
        "fusionbench": _summary("fusionbench", 40.0, 6.0),
    }
    assert bench.format_table(summaries).splitlines()[-1] == "| ours-model-scope / fusionbench | 0.10x | 0.08x | | | |"


# whole-model cut-offs


def _write_checkpoints(folder: Path, tensors_per_model: list[dict[str, torch.Tensor]]) -> list:
    readers = []
    for index, tensors in enumerate(tensors_per_model):
        model_dir = folder / f"m{index}"
        model_dir.mkdir()
        save_file(tensors, str(model_dir / "model.safetensors"))
        readers.append(compare_outputs.CheckpointReader(model_dir))
    return readers


def _expected_cutoff(readers: list, names: list[str], model: int, density: float) -> float:
    base = [readers[0].get(name).float().flatten() for name in names]
    deltas = torch.cat([readers[model].get(name).float().flatten() - b for name, b in zip(names, base)])
    d = deltas.numel()
    return float(torch.kthvalue(deltas.abs(), d - int(density * d)).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_cutoffs_match_kthvalue(tmp_path, dtype):
    # bfloat16 task vectors have zero low bits, so one histogram pass settles them. float32 ones need two.
    generator = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (37, 11), "b.weight": (203,), "c.weight": (5, 5)}
    base = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
    models = [base] + [
        {name: (tensor.float() + 0.01 * torch.randn(tensor.shape, generator=generator)).to(dtype)
         for name, tensor in base.items()}
        for _ in range(2)
    ]
    readers = _write_checkpoints(tmp_path, models)
    names = sorted(shapes)
    cutoffs, counting = compare_outputs.model_cutoffs(readers, names, 0.2)
    assert counting["entries"] == 37 * 11 + 203 + 25
    assert counting["k"] == int(0.2 * counting["entries"])
    assert counting["low_bit_passes"] == (1 if dtype == torch.float32 else 0)
    for model in (1, 2):
        assert cutoffs[model - 1] == _expected_cutoff(readers, names, model, 0.2)


def test_model_cutoffs_keep_largest_at_tiny_density(tmp_path):
    base = {"w": torch.zeros(10)}
    model = {"w": torch.tensor([0.0, 0.5, -3.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
    readers = _write_checkpoints(tmp_path, [base, model])
    cutoffs, counting = compare_outputs.model_cutoffs(readers, ["w"], 0.05)
    assert counting["k"] == 0
    assert cutoffs == [3.0]


def test_zero_sum_positions_with_model_cutoffs(tmp_path):
    base = {"w": torch.zeros(4)}
    # Position 0 cancels exactly (+q, -q), position 1 has a single kept entry, 2 and 3 keep nothing.
    first = {"w": torch.tensor([0.5, 1.0, 0.0, 0.125])}
    second = {"w": torch.tensor([-0.5, 0.0, 0.0, 0.125])}
    readers = _write_checkpoints(tmp_path, [base, first, second])
    tied, zero_sum = compare_outputs.classify_positions(readers, "w", [1.0, 1.0], cutoffs=[0.5, 0.5])
    assert zero_sum.tolist() == [True, False, False, False]
    # Position 0 is at the cut-off, but its zero sum already explains it.
    assert tied.tolist() == [False, False, False, False]
