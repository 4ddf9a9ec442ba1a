"""MC-SMoE expert merging: fewer experts per MoE layer, grouped and merged by routing statistics.

Li et al., Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy,
ICLR 2024, arXiv:2310.01334. The formulas are in `mergekit_plus/moe/grouping.py`.

This method does not map each input tensor to one output tensor, so it has no tensor operator.
The executor hands the plan to `mergekit_plus.moe.execute.run_moe`. That function runs the
calibration forward pass, then reads, merges and writes one MoE layer at a time. Not covered: the paper's
low-rank + sparse compression stage and its distillation, and adaptive (global) group counts,
because a transformers config has one expert count for every layer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_plus.methods.base import REQUIRED, MergeMethod, MergeTarget, Param, varying_param_problem

STRATEGIES = ("mc_smoe", "drop_least_used", "random_average")
ROUTER_ROWS = ("dominant", "weighted_mean")

PARAMS = (
    Param("num_experts", int, REQUIRED, "Experts per MoE layer after merging; at most the current count.", minimum=1),
    Param("calibration", str, REQUIRED,
          "Calibration text for the routing statistics: a path or glob pattern of .jsonl files (one object per "
          "line with `text`, `prompt`, `input` or `content`) or text files (one text per line), relative to the "
          "current folder."),
    Param("calibration_samples", int, 256, "How many calibration texts to run from the start of each calibration file.",
          minimum=1),
    Param("max_tokens", int, 512, "Tokens per calibration text; longer texts are truncated.", minimum=1),
    Param("align", bool, True,
          "Permute each expert's intermediate neurons to match its group's dominant expert before averaging."),
    Param("router_row", str, "dominant",
          "How a group's router row is formed: `dominant` keeps the dominant expert's row, `weighted_mean` "
          "averages the members' rows with the merge weights.", choices=ROUTER_ROWS),
    Param("strategy", str, "mc_smoe",
          "`mc_smoe` groups by router-logit similarity around the most used experts; the baselines "
          "`drop_least_used` keeps the most used experts only and `random_average` averages random groups "
          "with equal weights (seeded by the recipe's `seed`).", choices=STRATEGIES),
)

_EXPERT_NAME = re.compile(r"^(?P<block>.*layers\.\d+\.(?:block_sparse_moe|mlp))\.experts\.(?P<expert>\d+)\.")


def reject_tensor_call(method: str):
    """Return an operator that rejects a call as an ordinary merge: the MoE methods write whole layers at once."""

    def operator(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *,
                 params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                 seeds: Sequence[int], compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError(f"{method} has no per-tensor operator: the executor merges each MoE layer's "
                                  "experts with mergekit_plus.moe.execute.run_moe")

    return operator


def _check_mc_smoe_model(targets: Sequence[MergeTarget]) -> list[str]:
    """Check that the parameters are one value for the whole merge and the target count is possible."""
    problems = []
    if not targets:
        return problems
    problems += [problem for param in PARAMS if (problem := varying_param_problem(targets, param.name))]
    if len(targets[0].model_params) != 1:
        problems.append(f"mc_smoe merges the experts of one model, but the recipe lists {len(targets[0].model_params)}; "
                        "list only the MoE checkpoint under `models:`")
    problems += moe_target_problems("mc_smoe", targets)
    return problems


def moe_target_problems(method: str, targets: Sequence[MergeTarget]) -> list[str]:
    """Return the problems of an expert merge that show before any model is loaded: no experts, a
    target count above the experts, a missing calibration file. Both MoE methods use it."""
    from mergekit_plus.moe.calibration import calibration_problems

    experts: dict[str, set[int]] = defaultdict(set)
    for target in targets:
        match = _EXPERT_NAME.match(target.name)
        if match:
            experts[match["block"]].add(int(match["expert"]))
    if not experts:
        return [f"the model has no MoE experts (no tensor named like `layers.N.block_sparse_moe.experts.E.*` or "
                f"`layers.N.mlp.experts.E.*`), so {method} has nothing to merge; pass a Mixtral- or Qwen2-MoE-style "
                "checkpoint"]
    problems = []
    target_count = targets[0].params["num_experts"]
    for block, indices in sorted(experts.items()):
        if isinstance(target_count, int) and target_count > len(indices):
            problems.append(f"`num_experts: {target_count}` is above the {len(indices)} experts of {block}; "
                            f"choose a value from 1 to {len(indices)}")
            break
    calibration = targets[0].params.get("calibration")
    if isinstance(calibration, str):
        problems += calibration_problems(calibration)
    return problems


@dataclass(frozen=True)
class MoeMergeMethod(MergeMethod):
    """A merge method that rewrites whole MoE layers (experts, routers and the config) at once."""

    output_kind: str = "moe"


METHOD = MoeMergeMethod(
    name="mc_smoe",
    title="MC-SMoE expert merging",
    paper="Li et al., Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy, "
          "ICLR 2024, arXiv:2310.01334",
    summary="Merges each MoE layer's experts into fewer ones: groups around the most used experts by "
            "router-logit similarity, aligns neurons, averages by usage and keeps one router row per group.",
    requires_base=False,
    operator=reject_tensor_call("mc_smoe"),
    params=PARAMS,
    check_model=_check_mc_smoe_model,
)
