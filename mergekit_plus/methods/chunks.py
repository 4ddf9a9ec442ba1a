"""Chunked access to a merge's input tensors, so that operators never hold whole-tensor copies.

Operators receive their inputs in the stored dtype and convert one chunk at a time into the
compute dtype. A chunk is a run of `CHUNK_NUMEL` consecutive entries in flat (row-major)
order. No result depends on the chunk size, and the size is fixed rather than fitted to the
machine. At 2¹⁸ entries, a chunk of every input and the temporaries of a merge step fit in a
typical last-level cache. On a 2-core AMD EPYC with 32 MiB of L3, `merge run` of
`benchmarks/ties.yml` took 9.5 s with this size and 13.2 s with 2²⁰ entries (one run each).
Smaller chunks pay more of torch's per-call overhead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

CHUNK_NUMEL = 1 << 18


def flatten(tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` as a 1-D tensor in flat order: a view when it is contiguous, else a copy."""
    return tensor.reshape(-1)


def chunk_bounds(numel: int) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) of each chunk of a tensor with `numel` entries, in flat order."""
    for start in range(0, numel, CHUNK_NUMEL):
        yield start, min(numel, start + CHUNK_NUMEL)


def to_compute_dtype(chunk: torch.Tensor, compute_dtype: torch.dtype, buffer: torch.Tensor) -> torch.Tensor:
    """Return `chunk` in `compute_dtype`: the chunk itself when it already is, else its copy in `buffer`."""
    if chunk.dtype == compute_dtype:
        return chunk
    return buffer[: chunk.numel()].copy_(chunk)


class ChunkScratch:
    """Chunk-sized buffers that hot loops reuse across chunks and passes, looked up by name.

    Allocating a fresh tensor for every step of every chunk costs about as much as the step:
    the allocator hands blocks of a few MiB back to the system, so each new one page-faults
    again. A buffer is only valid until the next `get` with the same name and dtype.
    """

    def __init__(self, numel: int, device: torch.device):
        self._size = min(CHUNK_NUMEL, numel)
        self._device = device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Return the first `numel` entries of the buffer `name` in `dtype`, uninitialised."""
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(self._size, numel), dtype=dtype, device=self._device)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel]


@dataclass(frozen=True)
class Chunk:
    """One chunk of a merge: its flat bounds, the base's entries and the task vectors' entries."""

    start: int
    stop: int
    base: torch.Tensor
    deltas: list[torch.Tensor]


class TaskVectors:
    """The task vectors τᵢ = θᵢ − θ₀ of one tensor, computed chunk by chunk in the compute dtype.

    Each input is converted to the compute dtype before the subtraction, so a chunk contains the
    same values as the whole-tensor difference of converted inputs. The chunks are written into
    buffers that the next chunk reuses. A caller may change a chunk's deltas in place, but must
    be done with one chunk before it requests the next. `scratch` provides buffers for the steps
    that follow.
    """

    def __init__(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], compute_dtype: torch.dtype):
        self.shape = base.shape
        self.numel = base.numel()
        self.device = base.device
        self.compute_dtype = compute_dtype
        self.scratch = ChunkScratch(self.numel, self.device)
        self._base = flatten(base)
        self._models = [flatten(tensor) for tensor in tensors]

    @property
    def count(self) -> int:
        """The number of models."""
        return len(self._models)

    def chunks(self, models: Sequence[int] | None = None) -> Iterator[Chunk]:
        """Yield every chunk in flat order, with the deltas of `models` (default: all models)."""
        indices = range(len(self._models)) if models is None else models
        for start, stop in chunk_bounds(self.numel):
            length = stop - start
            base_buffer = self.scratch.get("base", self.compute_dtype, length)
            base = to_compute_dtype(self._base[start:stop], self.compute_dtype, base_buffer)
            deltas = [
                self.scratch.get(f"delta {index}", self.compute_dtype, length)
                .copy_(self._models[index][start:stop])
                .sub_(base)
                for index in indices
            ]
            yield Chunk(start, stop, base, deltas)

    def empty_output(self) -> torch.Tensor:
        """Return an uninitialised flat tensor for the merged result, in the compute dtype."""
        return torch.empty(self.numel, dtype=self.compute_dtype, device=self.device)
