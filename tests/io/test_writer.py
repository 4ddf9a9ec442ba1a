"""Shard writing: planned headers, rollover, index, aliases, atomic output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mergekit_plus.errors import OutputError
from mergekit_plus.io.writer import PlannedTensor, ShardWriter, StagedOutput, plan_layout


def write_all(folder, tensors, max_shard_bytes):
    planned = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    layout = plan_layout(planned, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    writer = ShardWriter(folder, layout)
    writer.open()
    # Out of order on purpose: the bytes must not depend on the order tensors finish.
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    return writer.finish()


def test_single_shard_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(7).to(torch.bfloat16)}
    files = write_all(tmp_path, tensors, 10**9)
    assert files == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)


def test_rollover_and_index(tmp_path):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(5)}  # 256 bytes each
    files = write_all(tmp_path, tensors, 600)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 256
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    with safe_open(tmp_path / index["weight_map"]["t2"], "pt") as handle:
        assert torch.equal(handle.get_tensor("t2"), torch.full((64,), 2.0))


def test_aliased_and_view_tensors_written(tmp_path):
    embedding = torch.randn(8, 4)
    tensors = {"embed": embedding, "head": embedding, "transposed": embedding.t(), "row": embedding[2]}
    write_all(tmp_path, tensors, 10**9)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert torch.equal(handle.get_tensor("head"), embedding)
        assert torch.equal(handle.get_tensor("transposed"), embedding.t())
        assert torch.equal(handle.get_tensor("row"), embedding[2])


def test_same_input_same_bytes(tmp_path):
    tensors = {"a": torch.randn(10), "b": torch.randn(3, 3)}
    write_all(tmp_path / "one", tensors, 10**9)
    write_all(tmp_path / "two", tensors, 10**9)
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "two/model.safetensors").read_bytes()


def test_writer_rejects_unplanned_shape(tmp_path):
    layout = plan_layout([PlannedTensor("a", torch.float32, (2,))], max_shard_bytes=100)
    writer = ShardWriter(tmp_path, layout)
    writer.open()
    with pytest.raises(RuntimeError, match="the plan says"):
        writer.write("a", torch.zeros(3))
    writer.close()


def test_staged_output_needs_force(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        StagedOutput(output, overwrite=False).check()
    staged = StagedOutput(output, overwrite=True)
    folder = staged.begin()
    (folder / "new.txt").write_text("new")
    staged.commit()
    assert sorted(p.name for p in output.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_output_abort_leaves_nothing(tmp_path):
    staged = StagedOutput(tmp_path / "out", overwrite=False)
    staged.begin()
    staged.abort()
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folder_removed(tmp_path):
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    staged = StagedOutput(tmp_path / "out", overwrite=False)
    staged.begin()
    assert not stale.exists()
    staged.abort()
