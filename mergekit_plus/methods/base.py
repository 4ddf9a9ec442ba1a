"""The contract between a merge method and the rest of the toolkit.

A method is a pure operator over tensors plus a declaration of its parameters. The planner
resolves every parameter for every tensor (recipe values, overrides, layer gradients, defaults),
checks them against the declaration, and then calls the operator with plain Python values.
The operator never opens files, prints, or changes its inputs in place.

A method that needs statistics over the whole model before it can merge one tensor (the TIES
trim over the whole flattened task vector, say) also declares a `ModelStatistics` reducer. The
executor feeds it every merged tensor, in one or more passes, and then hands its small result
to every operator call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

REQUIRED = object()
"""Default of a parameter that the recipe must set."""


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    `per_model` parameters (such as `weight` and `density`) take one value per input model;
    the others take one value for the whole merge. Either kind may vary by tensor.
    """

    name: str
    kind: type  # float, int, bool or str
    default: Any
    help: str
    per_model: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


MergeOperator = Callable[..., torch.Tensor]
"""Signature: operator(base, tensors, *, params, model_params, seeds, compute_dtype=torch.float32[, statistics][, layer]) -> Tensor.

- base: the base model's tensor, or None for methods that do not use a base.
- tensors: one tensor per input model, same shape as base, on one device with base.
  Every input, base included, comes in its stored dtype, and the inputs may differ in dtype.
- params: the method's global parameters for this tensor, every default filled in.
- model_params: one mapping per input model with its per-model parameters, defaults filled in.
- seeds: one 64-bit seed per input model, derived from (recipe seed, tensor name, model index).
  Methods without randomness ignore it.
- compute_dtype: the floating-point dtype of the arithmetic and of the result.
- statistics: passed only to a method whose `statistics` factory returned a reducer for this
  merge. It holds the reducer's `result()` entries of the models in `tensors`, in that order.
- layer: passed only to a method with `layered=True`: the `TensorLayer` of the tensor.
Returns a new tensor of the same shape, in compute_dtype, on the inputs' device.

The operator converts each input to compute_dtype before any arithmetic on it, so the result
is the method's formula on the converted inputs. It should convert a chunk at a time
(`methods/chunks.py`), not whole tensors, so that besides the result only a few chunk-sized
buffers per input exist.
"""

ParamCheck = Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], list[str]]
"""Cross-parameter check run by the planner for each tensor; returns problems as sentences."""


@dataclass(frozen=True)
class TensorLayer:
    """The place of a tensor in the model's stack of repeated blocks, for methods that scale by depth."""

    index: int | None
    """The 0-based block index, or None for a tensor outside the blocks (embeddings, final norm, head)."""
    count: int
    """The number of blocks L of the model, from its config or else from the tensor names."""


@dataclass(frozen=True)
class MergeTarget:
    """One tensor that the merge computes, with its resolved parameters, as whole-model hooks see it."""

    name: str
    params: Mapping[str, Any]
    model_params: tuple[Mapping[str, Any], ...]
    model_numel: tuple[int, ...]
    """How many entries of each model's task vector this tensor holds. That is its numel, except for
    a vocabulary tensor whose rows are matched by token: there only the rows that both the base and
    the model hold count."""
    layer: TensorLayer | None = None
    """The tensor's block, set only for a method with `layered=True`."""


ModelCheck = Callable[[Sequence[MergeTarget]], list[str]]
"""Check run by the planner over every merged tensor at once, for parameters that must agree
across tensors; returns problems as sentences."""

WHOLE_MERGE_REASON = "it must be one value for the whole merge"


def varying_param_problem(targets: Sequence[MergeTarget], name: str, reason: str = WHOLE_MERGE_REASON,
                          fix: str = "") -> str | None:
    """Return the problem when the global parameter `name` takes several values across `targets`, else None.

    The sentence names two of the values, each with a tensor that has it, then `reason` (why one
    value is needed) and `fix`, an alternative added after the usual advice.
    """
    values: dict[str, tuple[Any, str]] = {}
    for target in targets:
        value = target.params[name]
        values.setdefault(repr(value), (value, target.name))
    if len(values) <= 1:
        return None
    examples = ", ".join(f"{value} for {tensor}" for value, tensor in list(values.values())[:2])
    return f"`{name}` varies by tensor ({examples}), but {reason}; set a single `{name}` under `parameters:`{fix}"


class ModelStatistics(ABC):
    """A reducer of whole-model statistics, fed every merged tensor before any tensor is merged.

    The executor runs it as:

        while not statistics.done:
            for each merged tensor, in plan order: statistics.update(...)
            statistics.finish_pass()
        state = statistics.result()

    and then calls the operator of every tensor with `statistics=` the entries of `state` that
    belong to the tensor's models. The inputs of `update` are read as the merge pass reads them,
    one tensor at a time, so the reducer must keep only small state (histograms, norms, counts)
    for memory to stay bounded by the tensors in flight.
    """

    purpose: str = ""
    """A phrase that names what the passes compute, for `merge plan` and the log."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the statistics are complete, so that no further pass is needed."""

    @property
    @abstractmethod
    def max_passes(self) -> int:
        """The maximum number of passes over the merged tensors that the reducer takes."""

    @property
    def memory_bytes(self) -> int:
        """An upper bound on the reducer's memory during a pass, in bytes."""
        return 0

    @abstractmethod
    def update(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        *,
        models: Sequence[int],
        params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
    ) -> None:
        """Add one tensor (or one row group of a vocabulary tensor) to the current pass.

        `base`, `tensors`, `params` and `model_params` are what the operator of that tensor
        receives, and `models` gives the position in the recipe of the model of each entry of
        `tensors`. The inputs are in their stored dtypes and must not be changed.
        """

    @abstractmethod
    def finish_pass(self) -> None:
        """End the current pass, after `update` has seen every merged tensor."""

    @abstractmethod
    def result(self) -> tuple[Any, ...]:
        """Return the statistics, one entry per model in recipe order, once `done`."""

    def describe(self) -> list[str]:
        """Describe the result in one line per model, in recipe order, for the log."""
        return []


StatisticsFactory = Callable[[Sequence[MergeTarget], torch.dtype], "ModelStatistics | None"]
"""Return a fresh reducer for a merge of these tensors in this compute dtype, or None when the
method's parameters need no whole-model statistics."""


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its name, paper, parameters and operator."""

    name: str
    title: str
    paper: str
    summary: str
    requires_base: bool
    operator: MergeOperator
    params: tuple[Param, ...] = ()
    check: ParamCheck | None = None
    check_model: ModelCheck | None = None
    statistics: StatisticsFactory | None = None
    randomized: bool = False
    layered: bool = False
    """Whether the operator takes `layer=`, the tensor's block. The planner then rejects a model
    whose blocks it cannot find in the tensor names."""
    aliases: tuple[str, ...] = field(default=())

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None
