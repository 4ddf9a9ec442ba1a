"""Reading: header checks that catch broken files before any merge, and lazy per-tensor reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergekit_plus.errors import InputError
from mergekit_plus.io.reader import CheckpointReader, read_safetensors_header
from mergekit_plus.io.sources import ModelSource, resolve_source


def write_sharded(folder, tensors_per_shard):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    count = len(tensors_per_shard)
    for number, tensors in enumerate(tensors_per_shard, start=1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_folder_reads_each_tensor(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    folder = write_sharded(tmp_path / "ckpt", [{"a": a}, {"b": b}])
    reader = CheckpointReader(ModelSource("ckpt", folder))
    assert set(reader.tensors) == {"a", "b"}
    assert torch.equal(reader.read("a"), a)
    assert torch.equal(reader.read("b"), b)
    assert reader.read("b").dtype == torch.bfloat16


def test_missing_shard_named(tmp_path):
    folder = write_sharded(tmp_path / "ckpt", [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match=r"model-00002-of-00002\.safetensors: shard named by model\.safetensors\.index\.json is missing"):
        CheckpointReader(ModelSource("ckpt", folder))


def test_lfs_pointer_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(InputError, match=r"model\.safetensors: is a git-LFS pointer file"):
        read_safetensors_header(path)


def test_truncated_file_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError, match=r"is truncated: its header needs \d+ bytes, the file has \d+"):
        read_safetensors_header(path)


def test_index_pointing_at_wrong_shard(tmp_path):
    folder = write_sharded(tmp_path / "ckpt", [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["a"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"maps tensor 'a' to model-00002-of-00002\.safetensors"):
        CheckpointReader(ModelSource("ckpt", folder))


def test_pytorch_bin_read_with_weights_only(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.full((3,), 2.0)}, folder / "pytorch_model.bin")
    reader = CheckpointReader(ModelSource("ckpt", folder))
    assert torch.equal(reader.read("w"), torch.full((3,), 2.0))


def test_single_file_source(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(4)}, path)
    source = resolve_source(str(path))
    assert source.weights_file == path
    assert set(CheckpointReader(source).tensors) == {"w"}


def test_unknown_path_is_input_error(tmp_path):
    with pytest.raises(InputError, match=r"no such file or folder"):
        resolve_source(str(tmp_path / "nope"))


def test_folder_without_weights(tmp_path):
    with pytest.raises(InputError, match=r"no weights found"):
        CheckpointReader(ModelSource("x", tmp_path))
