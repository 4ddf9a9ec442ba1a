"""Shard writing: layout, headers, the index, and the atomic move of the finished folder into place.

The plan fixes the name, dtype and shape of every output tensor before the first one is merged, so
each shard's safetensors header is computed up front and written first. Each merged tensor is then
written at its offset as soon as it is ready. No shard is ever buffered in memory, the bytes do not
depend on the order in which tensors finish, and a tensor that shares memory with another (tied
weights, views) is simply written twice as separate bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_plus.errors import OutputError
from mergekit_plus.io.reader import DTYPE_TO_SAFETENSORS

logger = logging.getLogger(__name__)

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its name, its header bytes, and where each tensor's bytes go."""

    file_name: str
    header: bytes
    offsets: Mapping[str, int]
    tensors: Mapping[str, PlannedTensor]
    size: int


@dataclass(frozen=True)
class CheckpointLayout:
    shards: tuple[ShardLayout, ...]
    total_size: int

    def shard_of(self, name: str) -> ShardLayout:
        for shard in self.shards:
            if name in shard.offsets:
                return shard
        raise KeyError(name)


def plan_layout(tensors: Sequence[PlannedTensor], *, max_shard_bytes: int,
                metadata: Mapping[str, str] | None = None) -> CheckpointLayout:
    """Split `tensors`, in order, into shards of at most `max_shard_bytes` of data each.

    A tensor larger than the limit gets a shard of its own. One shard is named model.safetensors,
    several are named model-0000i-of-0000N.safetensors as transformers names them.
    """
    groups: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if groups[-1] and used + tensor.nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(tensor)
        used += tensor.nbytes

    count = len(groups)
    shards = []
    for number, group in enumerate(groups, start=1):
        name = SINGLE_FILE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        shards.append(_layout_shard(name, group, metadata or {}))
    return CheckpointLayout(tuple(shards), sum(t.nbytes for t in tensors))


def plan_single_file(tensors: Sequence[PlannedTensor], *, file_name: str,
                     metadata: Mapping[str, str] | None = None) -> CheckpointLayout:
    """Put every tensor into one file named `file_name`, for formats that load no index (PEFT adapters)."""
    return CheckpointLayout((_layout_shard(file_name, list(tensors), metadata or {}),), sum(t.nbytes for t in tensors))


def _layout_shard(file_name: str, group: list[PlannedTensor], metadata: Mapping[str, str]) -> ShardLayout:
    # Wider dtypes first keeps every tensor aligned to its element size, since safetensors allows
    # no padding between tensors and the data section starts 8-byte aligned.
    ordered = sorted(group, key=lambda t: -t.dtype.itemsize)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    relative: dict[str, int] = {}
    position = 0
    for tensor in ordered:
        header[tensor.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        relative[tensor.name] = position
        position += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    prefix = len(encoded).to_bytes(8, "little") + encoded
    offsets = {name: len(prefix) + offset for name, offset in relative.items()}
    return ShardLayout(file_name, prefix, offsets, {t.name: t for t in group}, len(prefix) + position)


@dataclass
class ShardWriter:
    """Writes the planned shards into `folder`, one tensor at a time, then the index.

    The only code that writes checkpoint files.
    """

    folder: Path
    layout: CheckpointLayout
    _descriptors: dict[str, int] = field(default_factory=dict)
    _pending: set[str] = field(default_factory=set)

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for shard in self.layout.shards:
            descriptor = os.open(self.folder / shard.file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._descriptors[shard.file_name] = descriptor
            _pwrite_all(descriptor, memoryview(shard.header), 0)
            os.ftruncate(descriptor, shard.size)
            self._pending.update(shard.offsets)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one finished tensor. Its dtype and shape must match the plan."""
        shard = self.layout.shard_of(name)
        planned = shard.tensors[name]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"internal error: tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                               f"the plan says {planned.dtype} {list(planned.shape)}")
        if name not in self._pending:
            raise RuntimeError(f"internal error: tensor {name} written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            _pwrite_all(self._descriptors[shard.file_name], memoryview(data.view(torch.uint8).numpy()),
                        shard.offsets[name])
        self._pending.discard(name)

    def finish(self) -> list[str]:
        """Check every tensor was written, flush the files, write the index; return the file names."""
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"internal error: {len(missing)} planned tensors were not written, e.g. {missing[0]}")
        for descriptor in self._descriptors.values():
            os.fsync(descriptor)
        self.close()
        names = [shard.file_name for shard in self.layout.shards]
        if len(names) > 1:
            weight_map = {name: shard.file_name for shard in self.layout.shards for name in shard.offsets}
            index = {"metadata": {"total_size": self.layout.total_size},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            names.append(INDEX_FILE_NAME)
        return names

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()


def _pwrite_all(descriptor: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(descriptor, view[done:], offset + done)


class StagedOutput:
    """A temporary folder beside the output, moved into place only by `commit`.

    A failed or killed merge leaves nothing under the output name. The next run for the same output
    removes the temporary folder of a killed run.
    """

    def __init__(self, output: Path, *, overwrite: bool) -> None:
        self.output = output
        self.overwrite = overwrite
        self.staging = output.parent / f".{output.name}.partial-{os.getpid()}"

    def check(self) -> None:
        """Raise OutputError if the output cannot be written. Touches nothing."""
        if self.output.exists() and not self.overwrite:
            raise OutputError(f"output folder {self.output} already exists",
                              hint="pass --force (or set `output.overwrite: true`) to replace it, or choose another folder")
        if self.output.exists() and not self.output.is_dir():
            raise OutputError(f"output {self.output} exists and is not a folder", hint="choose another output path")
        parent = _nearest_existing(self.output.parent)
        if not parent.is_dir():
            raise OutputError(f"cannot create the output {self.output}: {parent} is a file, not a folder",
                              hint="choose an output path under a folder")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write in {parent}: permission denied", hint="choose a folder you can write to")

    def check_free_space(self, required: int) -> None:
        """Raise OutputError when the output's disk has less than `required` bytes free."""
        free = shutil.disk_usage(_nearest_existing(self.output.parent)).free
        if free < required:
            raise OutputError(f"not enough space for the output {self.output}: it needs {required / 1e9:.3g} GB, "
                              f"the disk has {free / 1e9:.3g} GB free",
                              hint="free space on that disk, or choose an output folder on another disk")

    def begin(self) -> Path:
        self._remove_stale()
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self) -> None:
        self.check()
        retired = None
        if self.output.exists():
            retired = self.output.parent / f".{self.output.name}.replaced-{os.getpid()}"
            os.replace(self.output, retired)
        os.replace(self.staging, self.output)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _remove_stale(self) -> None:
        for candidate in self.output.parent.glob(f".{self.output.name}.partial-*"):
            pid = candidate.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _process_alive(int(pid)):
                logger.info("removing %s left by an interrupted run", candidate)
                shutil.rmtree(candidate, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
