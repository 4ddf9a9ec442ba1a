"""The contract between a merge method and the rest of the toolkit.

A method is a pure operator over tensors plus a declaration of its parameters. The planner
resolves every parameter for every tensor (recipe values, overrides, layer gradients, defaults),
checks them against the declaration, and then calls the operator with plain Python values.
The operator never opens files, prints, or changes its inputs in place.
"""

from __future__ import annotations

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
"""Signature: operator(base, tensors, *, params, model_params, seeds, compute_dtype=torch.float32) -> Tensor.

- base: the base model's tensor, or None for methods that do not use a base.
- tensors: one tensor per input model, same shape as base, on one device with base.
  Every input, base included, comes in its stored dtype, and the inputs may differ in dtype.
- params: the method's global parameters for this tensor, every default filled in.
- model_params: one mapping per input model with its per-model parameters, defaults filled in.
- seeds: one 64-bit seed per input model, derived from (recipe seed, tensor name, model index).
  Methods without randomness ignore it.
- compute_dtype: the floating-point dtype of the arithmetic and of the result.
Returns a new tensor of the same shape, in compute_dtype, on the inputs' device.

The operator converts each input to compute_dtype before any arithmetic on it, so the result
is the method's formula on the converted inputs. It should convert a chunk at a time
(`methods/chunks.py`), not whole tensors, so that besides the result only a few chunk-sized
buffers per input exist.
"""

ParamCheck = Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], list[str]]
"""Cross-parameter check run by the planner for each tensor; returns problems as sentences."""


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
    randomized: bool = False
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
