"""The registry of merge methods. Each method lives in its own module and declares `METHOD`."""

from __future__ import annotations

from mergekit_plus.methods import dare, linear, task_arithmetic, ties
from mergekit_plus.methods import consensus
from mergekit_plus.methods import lines
from mergekit_plus.methods import pcb
from mergekit_plus.methods import tall_masks
from mergekit_plus.methods import mwa
from mergekit_plus.methods import mc_smoe
from mergekit_plus.methods import adamerging
from mergekit_plus.methods import sub_moe
from mergekit_plus.methods import frank_wolfe
from mergekit_plus.methods.base import MergeMethod, Param

_ALL: tuple[MergeMethod, ...] = (
    linear.METHOD,
    task_arithmetic.METHOD,
    ties.METHOD,
    dare.DARE_LINEAR,
    dare.DARE_TIES,
    consensus.METHOD,
    lines.METHOD,
    pcb.METHOD,
    tall_masks.METHOD,
    mwa.METHOD,
    mc_smoe.METHOD,
    adamerging.METHOD,
    sub_moe.METHOD,
    frank_wolfe.METHOD,
)

METHODS: dict[str, MergeMethod] = {}
for _method in _ALL:
    METHODS[_method.name] = _method
    for _alias in _method.aliases:
        METHODS[_alias] = _method


def get_method(name: str) -> MergeMethod | None:
    """Return the method registered under `name` or one of its aliases, or None."""
    return METHODS.get(name)


def list_methods() -> list[MergeMethod]:
    """Return every method once, in registry order."""
    return list(_ALL)


__all__ = ["METHODS", "MergeMethod", "Param", "get_method", "list_methods"]
