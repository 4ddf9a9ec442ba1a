"""Lazy per-tensor reading of checkpoints, with every shard header checked up front.

Safetensors shards are read with positional reads (`os.preadv`) into a fresh buffer per tensor, not
memory-mapped. A mapped file keeps its touched pages in the process's resident set, so reading a
large model through a map grows RSS with the model. A positional read of one tensor costs one tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_plus.errors import InputError
from mergekit_plus.io.sources import ModelSource

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
for _name, _dtype in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _dtype):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _dtype)

_LFS_POINTER_PREFIX = b"version https://git-lfs"
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it. `start` and `end` are absolute byte offsets in `file`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _broken(file: Path, cause: str, hint: str) -> InputError:
    return InputError(f"{file}: {cause}", hint=hint)


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header: tensors and metadata. Raise InputError naming the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if prefix.startswith(_LFS_POINTER_PREFIX[:8]) and (prefix + handle.read(64)).startswith(_LFS_POINTER_PREFIX):
                raise _broken(file, "is a git-LFS pointer file, not the weights",
                              "fetch the real file (`git lfs pull` in that repo, or download it again)")
            if len(prefix) < 8:
                raise _broken(file, f"is too short to be a safetensors file ({size} bytes)",
                              "the file is truncated or empty; download it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise _broken(file, f"header length {header_len} does not fit in the file ({size} bytes)",
                              "the file is truncated or not a safetensors file; download it again")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise _broken(file, f"cannot be read ({exc.strerror or exc})", "check the file exists and is readable") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _broken(file, "has a corrupt header (not valid JSON)", "download the file again") from exc
    if not isinstance(header, dict):
        raise _broken(file, "has a corrupt header (not a JSON object)", "download the file again")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    furthest = 0
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(dim) for dim in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _broken(file, f"tensor {name!r} has an invalid header entry ({exc})", "download the file again") from exc
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise _broken(file, f"tensor {name!r} spans {end - begin} bytes but shape {list(shape)} of "
                          f"{entry['dtype']} needs {expected}", "download the file again")
        furthest = max(furthest, end)
        tensors[name] = TensorInfo(name, dtype, shape, file, data_start + begin, data_start + end)
    if furthest > data_size:
        raise _broken(file, f"is truncated: its header needs {data_start + furthest} bytes, the file has {size}",
                      "download the file again (an interrupted download or copy leaves this)")
    return tensors, metadata


class CheckpointReader:
    """The tensors of one checkpoint, found from its shard headers and read one at a time."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.config: dict[str, Any] | None = _read_config(source.folder)
        self.tensors: dict[str, TensorInfo] = {}
        self.files: list[Path] = []
        self._torch_files: dict[Path, dict[str, torch.Tensor]] = {}
        self._scan()

    @property
    def label(self) -> str:
        return self.source.label

    def _scan(self) -> None:
        source = self.source
        if source.weights_file is not None:
            self._add_safetensors(source.weights_file)
            return
        folder = source.folder
        for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_file = folder / index_name
            if index_file.exists():
                weight_map = _read_weight_map(index_file)
                for shard in dict.fromkeys(weight_map.values()):
                    self._add_file(folder / shard, index_file)
                self._check_weight_map(index_file, weight_map)
                return
            if (folder / single_name).exists():
                self._add_file(folder / single_name, None)
                return
        loose = sorted(folder.glob("*.safetensors"))
        if len(loose) == 1:
            self._add_safetensors(loose[0])
            return
        raise InputError(
            f"model {source.label}: no weights found in {folder} "
            "(expected model.safetensors, a sharded model-*.safetensors with its index, or pytorch_model.bin)",
            hint="point `model:` at the folder that holds the checkpoint files",
        )

    def _check_weight_map(self, index_file: Path, weight_map: dict[str, str]) -> None:
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise _broken(index_file, f"maps tensor {name!r} to {shard}, but that shard does not hold it",
                              "the index and shards are from different versions; download the checkpoint again")

    def _add_file(self, file: Path, index_file: Path | None) -> None:
        if not file.exists():
            named_by = f" named by {index_file.name}" if index_file else ""
            raise InputError(f"{file}: shard{named_by} is missing",
                             hint="download the missing shard, or the whole checkpoint again")
        if file.suffix == ".safetensors":
            self._add_safetensors(file)
        else:
            self._add_torch_file(file)

    def _add_safetensors(self, file: Path) -> None:
        tensors, _ = read_safetensors_header(file)
        self._add_tensors(file, tensors)

    def _add_torch_file(self, file: Path) -> None:
        with open(file, "rb") as handle:
            if handle.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX:
                raise _broken(file, "is a git-LFS pointer file, not the weights", "fetch the real file (`git lfs pull`)")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a corrupt or unsafe pickle
            raise _broken(file, f"cannot be loaded with torch.load(weights_only=True): {exc}",
                          "convert it to safetensors, or download it again") from exc
        if not isinstance(state, dict):
            raise _broken(file, "does not hold a state dict", "convert it to safetensors")
        self._torch_files[file] = state
        infos = {
            name: TensorInfo(name, tensor.dtype, tuple(tensor.shape), file, 0, tensor.numel() * tensor.element_size())
            for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor)
        }
        self._add_tensors(file, infos)

    def _add_tensors(self, file: Path, tensors: dict[str, TensorInfo]) -> None:
        for name, info in tensors.items():
            if name in self.tensors:
                raise _broken(file, f"tensor {name!r} is also stored in {self.tensors[name].file.name}",
                              "the checkpoint is inconsistent; download it again")
            self.tensors[name] = info
        self.files.append(file)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a new CPU tensor that owns its memory."""
        info = self.tensors[name]
        if info.file in self._torch_files:
            return self._torch_files[info.file][name].clone()
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            _pread_into(info.file, buffer, info.start)
        return buffer.view(info.dtype).reshape(info.shape)


def _pread_into(file: Path, buffer: torch.Tensor, offset: int) -> None:
    view = memoryview(buffer.numpy())
    descriptor = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            count = os.preadv(descriptor, [view[done:]], offset + done)
            if count == 0:
                raise InputError(f"{file}: ended early while reading (file changed or truncated during the merge)",
                                 hint="do not modify inputs while a merge runs")
            done += count
    finally:
        os.close(descriptor)


def _read_weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _broken(index_file, f"is not a valid checkpoint index ({exc})", "download it again") from exc
    if not isinstance(weight_map, dict):
        raise _broken(index_file, "has a weight_map that is not a mapping", "download it again")
    return weight_map


def _read_config(folder: Path) -> dict[str, Any] | None:
    config_file = folder / "config.json"
    if not config_file.exists():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _broken(config_file, f"is not valid JSON ({exc})", "fix or download config.json again") from exc
    return config if isinstance(config, dict) else None
