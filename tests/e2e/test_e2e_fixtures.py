"""Checks of the checkpoint fixtures themselves, so that a failing merge test is not a broken fixture."""

from __future__ import annotations

import json

import pytest
import torch
from merge_helpers import header_dtypes, load_and_generate, read_tensors
from safetensors import SafetensorError, safe_open


@pytest.mark.parametrize(
    "fixture_name",
    [
        "llama_base",
        "llama_base_sharded",
        "llama_base_bf16",
        "llama_fine_tune_bf16",
        "llama_fine_tune_fp16",
        "llama_resized_vocab",
        "qwen2_tied_base",
        "qwen2_tied_fine_tune",
        "hub_repo_id",
    ],
)
def test_fixture_loads_with_transformers(fixture_name, request):
    load_and_generate(request.getfixturevalue(fixture_name))


def test_fine_tunes_differ_from_base(llama_base, llama_fine_tunes):
    base = read_tensors(llama_base)
    for fine_tune in llama_fine_tunes:
        tensors = read_tensors(fine_tune)
        assert sorted(tensors) == sorted(base)
        for name, tensor in tensors.items():
            assert not torch.equal(tensor, base[name]), (fine_tune.name, name)


def test_builders_are_deterministic(tmp_path, llama_fine_tunes):
    import checkpoints

    again = checkpoints.build_llama_fine_tune(tmp_path / "again", seed=1)

    assert (again / "model.safetensors").read_bytes() == (llama_fine_tunes[0] / "model.safetensors").read_bytes()


def test_tied_qwen2_has_no_head(qwen2_tied_base):
    assert "lm_head.weight" not in read_tensors(qwen2_tied_base)
    assert json.loads((qwen2_tied_base / "config.json").read_text())["tie_word_embeddings"] is True


def test_sharded_base_has_three_shards(llama_base_sharded):
    index = json.loads((llama_base_sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3


def test_dtype_variants(llama_base_bf16, llama_fine_tune_fp16):
    assert set(header_dtypes(llama_base_bf16).values()) == {"BF16"}
    assert set(header_dtypes(llama_fine_tune_fp16).values()) == {"F16"}


def test_resized_vocab_has_34_rows(llama_resized_vocab):
    tensors = read_tensors(llama_resized_vocab)
    assert tensors["model.embed_tokens.weight"].shape == (34, 32)
    assert tensors["lm_head.weight"].shape == (34, 32)


def test_broken_shards_are_broken(broken_sharded_checkpoints):
    missing_folder, missing_shard = broken_sharded_checkpoints["missing"]
    assert not missing_shard.exists()
    assert missing_shard.name in (missing_folder / "model.safetensors.index.json").read_text()

    _, pointer = broken_sharded_checkpoints["lfs-pointer"]
    assert pointer.read_text().startswith("version https://git-lfs.github.com/spec/v1")

    _, truncated = broken_sharded_checkpoints["truncated"]
    with pytest.raises(SafetensorError):
        with safe_open(truncated, framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)


def test_odd_tensors_in_place(
    transposed_probe_pair, llama_int8_weights, llama_quantization_config, llama_bf16_large_norm, llama_fine_tune_nan
):
    import checkpoints

    base, fine_tune = transposed_probe_pair
    assert read_tensors(base)[checkpoints.PROBE_TENSOR].shape == (1, 8)
    assert read_tensors(fine_tune)[checkpoints.PROBE_TENSOR].shape == (8, 1)

    assert header_dtypes(llama_int8_weights)["model.layers.0.self_attn.q_proj.weight"] == "I8"
    config = json.loads((llama_quantization_config / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"

    assert read_tensors(llama_bf16_large_norm)[checkpoints.EDITED_NORM][3].item() == 99840.0
    assert torch.isnan(read_tensors(llama_fine_tune_nan)[checkpoints.EDITED_NORM][3])
