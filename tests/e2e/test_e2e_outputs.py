"""The output folder of `merge run`: shards and index, side files, model card, seeds, overwrite rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import (
    CLI_ENV,
    SHARD_NAME,
    assert_mentions,
    file_metadata,
    folder_listing,
    invoke,
    load_and_generate,
    message_of,
    read_card,
    read_header,
    read_tensors,
    weight_files,
    write_recipe,
)

SIDE_FILES = [
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]


def task_arithmetic_recipe(base, fine_tunes, output: Path, **extra) -> dict:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": 0.5}} for fine_tune in fine_tunes],
        "output": {"path": output},
    }
    recipe.update(extra)
    return recipe


@pytest.mark.parametrize("pinned", [False, True], ids=["main", "commit"])
def test_hub_id_resolves_from_cache(pinned, tmp_path, hub_repo_id, llama_base, llama_fine_tunes):
    import checkpoints

    base = {"model": hub_repo_id, "revision": checkpoints.commit_hash(hub_repo_id)} if pinned else hub_repo_id
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(base, llama_fine_tunes, output))

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    load_and_generate(output)
    front_matter, body = read_card(output)
    base_models = front_matter["base_model"]
    if isinstance(base_models, str):
        base_models = [base_models]
    # The fine-tunes are local folders, which the Hub cannot link to.
    assert base_models == [hub_repo_id]
    assert hub_repo_id in body

    # The Hub copy of the base and the local folder hold the same tensors.
    local_output = tmp_path / "merged-local"
    local_recipe = write_recipe(
        tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, local_output), name="local.yaml"
    )
    invoke(["run", local_recipe, "--quiet"], expected_exit=0)
    local = read_tensors(local_output)
    for name, tensor in read_tensors(output).items():
        assert torch.equal(tensor, local[name]), name


def test_small_shard_size_writes_shards(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path,
        task_arithmetic_recipe(llama_base, llama_fine_tunes, output) | {"output": {"path": output, "shard_size": "20KB"}},
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    shards = weight_files(output)
    assert len(shards) >= 3
    assert not (output / "model.safetensors").exists()
    for shard in shards:
        match = SHARD_NAME.fullmatch(shard.name)
        assert match, shard.name
        assert int(match.group(2)) == len(shards), shard.name
        assert file_metadata(shard) == {"format": "pt"}, shard.name
        # Only a shard holding a single tensor larger than the limit may exceed it. The recipe
        # reads KB as 1000 bytes, as huggingface_hub does.
        entries = [entry for name, entry in read_header(shard).items() if name != "__metadata__"]
        data_bytes = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in entries)
        assert data_bytes <= 20_000 or len(entries) == 1, shard.name

    index = json.loads((output / "model.safetensors.index.json").read_text())
    merged = read_tensors(output)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert sorted(index["weight_map"]) == sorted(merged)
    assert sorted(set(index["weight_map"].values())) == [shard.name for shard in shards]
    for name, shard_name in index["weight_map"].items():
        assert name in read_header(output / shard_name), name

    load_and_generate(output)


@pytest.mark.parametrize("source", ["base", "second-fine-tune"])
def test_side_files_copied_from_tokenizer_source(source, tmp_path, llama_base, llama_fine_tunes):
    source_folder = llama_base if source == "base" else llama_fine_tunes[1]
    source_key = "base" if source == "base" else str(llama_fine_tunes[1])
    output = tmp_path / "merged"
    recipe = write_recipe(
        tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, output, tokenizer={"source": source_key})
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    for name in SIDE_FILES:
        assert (output / name).read_bytes() == (source_folder / name).read_bytes(), name
    # Every input's side files differ, so the copies show which input they came from.
    other_folder = llama_fine_tunes[0]
    assert (other_folder / "tokenizer.model").read_bytes() != (source_folder / "tokenizer.model").read_bytes()

    _, body = read_card(output)
    source_lines = [line for line in body.splitlines() if "tokenizer" in line.lower() and source_folder.name in line]
    assert source_lines, body

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<s>user: hi</s>")
    load_and_generate(output)


def test_card_and_recipe_copy(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe_dict = {
        "merge_method": "dare_ties",
        "base_model": llama_base,
        "models": [
            {"model": llama_fine_tunes[0], "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": llama_fine_tunes[1], "parameters": {"weight": 0.7, "density": 0.6}},
        ],
        "parameters": {"lambda": 0.9},
        "seed": 4321,
        "output": {"path": output},
    }
    recipe = write_recipe(tmp_path, recipe_dict)

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    front_matter, body = read_card(output)
    # Only Hub ids belong in base_model, and every input here is a local folder.
    assert not front_matter.get("base_model")
    assert_mentions(body, r"dare_ties", r"\b4321\b", r"density", r"\b0\.3\b", r"\b0\.6\b", r"lambda")
    for model in [llama_base, *llama_fine_tunes]:
        assert model.name in body, model.name
    assert "```yaml" in body

    stored = yaml.safe_load((output / "merge_recipe.yaml").read_text())
    assert stored["merge_method"] == "dare_ties"
    assert stored["seed"] == 4321
    assert [entry["parameters"]["density"] for entry in stored["models"]] == [0.3, 0.6]
    load_and_generate(output)


def run_dare_ties(tmp_path: Path, base: Path, fine_tunes, *, seed: int, threads: int, label: str) -> Path:
    output = tmp_path / label
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [{"model": fine_tune, "parameters": {"weight": 1.0, "density": 0.5}} for fine_tune in fine_tunes],
            "seed": seed,
            "output": {"path": output},
        },
        name=f"{label}.yaml",
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        invoke(["run", recipe, "--quiet"], expected_exit=0)
    finally:
        torch.set_num_threads(previous_threads)
    return output


def test_dare_ties_is_reproducible(tmp_path, llama_base, llama_fine_tunes):
    first = run_dare_ties(tmp_path, llama_base, llama_fine_tunes, seed=11, threads=1, label="seed-11-threads-1")
    again = run_dare_ties(tmp_path, llama_base, llama_fine_tunes, seed=11, threads=2, label="seed-11-threads-2")
    other = run_dare_ties(tmp_path, llama_base, llama_fine_tunes, seed=12, threads=1, label="seed-12")

    first_shards = {path.name: path.read_bytes() for path in weight_files(first)}
    assert first_shards == {path.name: path.read_bytes() for path in weight_files(again)}
    assert first_shards != {path.name: path.read_bytes() for path in weight_files(other)}

    _, body = read_card(first)
    assert_mentions(body, r"seed\W{0,10}11\b")
    _, body = read_card(other)
    assert_mentions(body, r"seed\W{0,10}12\b")
    load_and_generate(first)


def test_existing_output_kept_without_force(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "notes.txt").write_text("an earlier merge\n")
    before = folder_listing(output)
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--quiet"], expected_exit=3)

    assert_mentions(message_of(result), output.name, r"--force")
    assert folder_listing(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "recipe.yaml"]

    invoke(["run", recipe, "--quiet", "--force"], expected_exit=0)

    assert not (output / "notes.txt").exists()
    load_and_generate(output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "recipe.yaml"]


def test_overwrite_key_replaces_output(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "notes.txt").write_text("an earlier merge\n")
    recipe = write_recipe(
        tmp_path,
        task_arithmetic_recipe(llama_base, llama_fine_tunes, output) | {"output": {"path": output, "overwrite": True}},
    )

    invoke(["run", recipe, "--quiet"], expected_exit=0)

    assert not (output / "notes.txt").exists()
    load_and_generate(output)


def test_output_option_overrides_recipe(tmp_path, llama_base, llama_fine_tunes):
    in_recipe = tmp_path / "from-recipe"
    on_command_line = tmp_path / "from-option"
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, in_recipe))

    invoke(["run", recipe, "-o", on_command_line, "--quiet"], expected_exit=0)

    assert not in_recipe.exists()
    load_and_generate(on_command_line)


def console_script() -> Path:
    script = Path(sys.executable).parent / ("merge.exe" if os.name == "nt" else "merge")
    assert script.exists(), f"{script} is missing: install the project with `pip install -e .`"
    return script


def test_console_script_runs_merge(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, output))

    completed = subprocess.run(
        [console_script(), "run", recipe, "--output", output, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    load_and_generate(output)


def test_console_script_error_has_no_traceback(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    output.mkdir()
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, output))

    completed = subprocess.run(
        [console_script(), "run", recipe], capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 3, completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    assert_mentions(completed.stderr + completed.stdout, r"--force")


def test_failed_merge_keeps_old_output(tmp_path, llama_base_bf16, llama_bf16_large_norm):
    """A merge that fails while writing (float16 overflow) leaves the folder that --force would replace."""
    output = tmp_path / "merged"
    output.mkdir()
    (output / "notes.txt").write_text("an earlier merge\n")
    before = folder_listing(output)
    recipe = write_recipe(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": llama_base_bf16,
            "models": [{"model": llama_bf16_large_norm, "parameters": {"weight": 1.0}}],
            "out_dtype": "float16",
            "output": {"path": output},
        },
    )

    invoke(["run", recipe, "--quiet", "--force"], expected_exit=4)

    assert folder_listing(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "recipe.yaml"]


def test_device_auto_runs(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, output))

    invoke(["run", recipe, "--quiet", "--device", "auto"], expected_exit=0)

    load_and_generate(output)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_rejected(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, task_arithmetic_recipe(llama_base, llama_fine_tunes, output))

    from typer.testing import CliRunner

    from mergekit_plus.cli import app

    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet", "--device", "cuda"], env=CLI_ENV)

    # No exit code is documented for this case, so any failure without a traceback passes.
    assert result.exit_code != 0
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    assert_mentions(message_of(result), r"cuda")
    assert not output.exists()
