"""The MoE executor: routing statistics first, then every MoE layer read, merged and written in turn.

Only one layer's experts are in memory during the merge. The calibration pass before it loads the
whole model with transformers, so it needs the memory of the model in float32.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from mergekit_plus.errors import InputError, MergeValueError, RecipeError
from mergekit_plus.execute import MergeSummary, _write_side_files, _writing, select_device
from mergekit_plus.io.writer import PlannedTensor, ShardWriter, plan_layout
from mergekit_plus.moe.calibration import LayerRouting, gather_routing, read_calibration_texts
from mergekit_plus.moe.grouping import (
    ExpertGroup,
    align_to,
    group_by_similarity,
    groups_of_dominants_only,
    merge_group,
    permute_expert,
    random_groups,
    router_logit_similarity,
    router_rows,
)
from mergekit_plus.moe.layout import EXPERT_COUNT_KEYS, ExpertLayer, find_expert_layers
from mergekit_plus.moe.subspace import cluster_experts, subspace_merge
from mergekit_plus.plan import Plan
from mergekit_plus.sizes import format_size

logger = logging.getLogger(__name__)

GROUPS_FILE_NAME = "expert_groups.json"
_FUSED_INPUT_ROLES = ("gate", "up")


def run_moe(plan: Plan, *, recipe_data: dict[str, Any], device: str = "cpu", progress: bool = True) -> MergeSummary:
    """Merge the experts of the plan's one MoE model into `num_experts` per layer and write the output folder.

    NOTE: `progress` is accepted for the executor's signature, but this path shows no progress bar yet.
    """
    started = time.perf_counter()
    target = select_device(device)
    params = _merge_parameters(plan)
    reader = plan.models[0].reader

    # 1. Checks that need only headers and the config, before the calibration pass.
    layers = _expert_layers(plan)
    count = params["num_experts"]
    _check_target_count(layers, count)
    config = dict(plan.config or {})
    count_keys = [key for key in EXPERT_COUNT_KEYS if key in config]
    if not count_keys:
        raise InputError(f"config.json of {plan.models[0].label} has no expert count ({' or '.join(EXPERT_COUNT_KEYS)})",
                         hint="expert merging needs a Mixtral, Qwen2-MoE or OLMoE style config")
    top_k = int(config.get("num_experts_per_tok", 1))

    # 2. Routing statistics and groups, per layer.
    texts = read_calibration_texts(params["calibration"], limit=params["calibration_samples"])
    logger.info("calibration: %d texts from %s", len(texts), params["calibration"])
    routing = gather_routing(plan.models[0].source.folder, texts, top_k=top_k, max_tokens=params["max_tokens"],
                             device=target, expert_outputs=plan.method.name == "sub_moe")
    groups = {}
    for layer in layers:
        if layer.layer not in routing:
            raise InputError(f"the calibration pass never reached the router of {layer.block}",
                             hint="check that the model's modules match its stored tensor names")
        groups[layer.layer] = _group_layer(plan.method.name, layer, routing[layer.layer], count, params,
                                           seed=plan.recipe.seed)
        _log_layer(layer, routing[layer.layer], groups[layer.layer])

    # 3. The output layout: every planned tensor, with each MoE layer's experts and router resized.
    moe_names = {name: layer for layer in layers
                 for name in (*layer.expert_tensors(), *layer.router_tensors(reader.tensors))}
    planned = _planned_outputs(plan, layers, moe_names, count)
    layout = plan_layout(planned, max_shard_bytes=plan.recipe.shard_size_bytes, metadata={"format": "pt"})
    plan.staged.check_free_space(layout.total_size)
    new_config = {**config, **{key: count for key in count_keys}, "num_experts_per_tok": min(top_k, count)}
    if top_k > count:
        logger.warning("num_experts_per_tok lowered from %d to %d, the new expert count", top_k, count)

    # 4. Tensors in plan order; a MoE layer is merged and written whole at its first tensor.
    with _writing(plan.output):
        staging = plan.staged.begin()
    writer = ShardWriter(staging, layout)
    try:
        with _writing(plan.output):
            writer.open()
        done: set[int] = set()
        for job in plan.jobs:
            layer = moe_names.get(job.name)
            if layer is None:
                tensor = reader.read(job.name)
                out = tensor if job.action == "copy" else tensor.to(plan.out_dtype)
                with _writing(plan.output):
                    writer.write(job.name, out)
                continue
            if layer.layer in done:
                continue
            for name, tensor in _merge_layer(plan.method.name, reader, layer, groups[layer.layer], params,
                                             plan.compute_dtype, target).items():
                with _writing(plan.output):
                    writer.write(name, _checked(name, tensor).to(device="cpu", dtype=plan.out_dtype))
            done.add(layer.layer)

        # 5. Side files, the group report, then the move into place.
        with _writing(plan.output):
            files = writer.finish()
            files += _write_side_files(replace(plan, config=new_config, layout=layout), staging, recipe_data)
            report = _groups_report(plan.method.name, layers, routing, groups, params)
            (staging / GROUPS_FILE_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            files.append(GROUPS_FILE_NAME)
            plan.staged.commit()
    except BaseException:
        writer.close()
        plan.staged.abort()
        raise

    seconds = time.perf_counter() - started
    logger.info("merged %d MoE layers to %d experts each: %s in %s", len(layers), count,
                format_size(layout.total_size), plan.output)
    return MergeSummary(plan.output, tuple(files), len(planned), layout.total_size, seconds)


def describe_moe(plan: Plan) -> dict[str, Any]:
    """Describe what an expert merge will write, from headers and the config alone: for `merge plan`.

    The expert and router tensors of each MoE layer are rewritten with `num_experts` experts; every
    other tensor is copied unchanged. The calibration pass loads the whole model in float32.
    """
    params = _merge_parameters(plan)
    reader = plan.models[0].reader
    layers = _expert_layers(plan)
    count = params["num_experts"]
    _check_target_count(layers, count)
    moe_names = {name: layer for layer in layers
                 for name in (*layer.expert_tensors(), *layer.router_tensors(reader.tensors))}
    planned = _planned_outputs(plan, layers, moe_names, count)
    layout = plan_layout(planned, max_shard_bytes=plan.recipe.shard_size_bytes, metadata={"format": "pt"})
    calibration_bytes = sum(info.numel for info in reader.tensors.values()) * 4
    return {
        "layers": len(layers),
        "experts_before": sorted({layer.num_experts for layer in layers}),
        "experts_after": count,
        "calibration": params["calibration"],
        "calibration_samples": params["calibration_samples"],
        "rewritten_in": len(moe_names),
        "rewritten_out": len(planned) - sum(1 for job in plan.jobs if job.name not in moe_names),
        "copied": sum(1 for job in plan.jobs if job.name not in moe_names),
        "shards": [{"file": shard.file_name, "bytes": shard.size, "tensors": len(shard.offsets)}
                   for shard in layout.shards],
        "total_bytes": layout.total_size,
        "calibration_memory_bytes": calibration_bytes,
    }


def _merge_parameters(plan: Plan) -> dict[str, Any]:
    """Return the method's global parameters as resolved by the planner (one value for the whole merge)."""
    merged = next((job for job in plan.jobs if job.action == "merge"), None)
    if merged is not None:
        return dict(merged.params)
    return {param.name: plan.recipe.parameters.get(param.name, param.default) for param in plan.method.params}


def _expert_layers(plan: Plan) -> list[ExpertLayer]:
    shapes = {name: info.shape for name, info in plan.models[0].reader.tensors.items()}
    try:
        layers = find_expert_layers(shapes)
    except ValueError as exc:
        raise InputError(f"{plan.models[0].label}: {exc}", hint="merge a complete MoE checkpoint") from exc
    if not layers:
        raise InputError(f"{plan.models[0].label} has no MoE experts (`layers.N.block_sparse_moe.experts.*` or "
                         "`layers.N.mlp.experts.*`)",
                         hint=f"{plan.method.name} merges the experts of a Mixtral, Qwen2-MoE or OLMoE style "
                              "checkpoint")
    return layers


def _check_target_count(layers: list[ExpertLayer], count: int) -> None:
    for layer in layers:
        if count > layer.num_experts:
            raise RecipeError([f"parameters.num_experts: {count} is above the {layer.num_experts} experts of "
                               f"{layer.block}; choose a value from 1 to {layer.num_experts}"])


def _group_layer(method: str, layer: ExpertLayer, routing: LayerRouting, count: int, params: dict[str, Any], *,
                 seed: int) -> list[ExpertGroup]:
    if method == "sub_moe":
        return cluster_experts(routing.usage, routing.output_similarity, count, seed=seed + layer.layer,
                               restarts=params["kmeans_restarts"])
    strategy = params["strategy"]
    if strategy == "drop_least_used":
        return groups_of_dominants_only(routing.usage, count)
    if strategy == "random_average":
        return random_groups(layer.num_experts, count, seed=seed + layer.layer)
    return group_by_similarity(routing.usage, router_logit_similarity(routing.logit_gram), count)


def _log_layer(layer: ExpertLayer, routing: LayerRouting, groups: list[ExpertGroup]) -> None:
    usage = " ".join(f"{value:.3f}" for value in routing.usage.tolist())
    shown = "; ".join("+".join(str(member) for member in group.members) for group in groups)
    logger.info("layer %d: usage over %d tokens [%s]; groups %s", layer.layer, routing.tokens, usage, shown)


def _planned_outputs(plan: Plan, layers: list[ExpertLayer], moe_names: dict[str, ExpertLayer],
                     count: int) -> list[PlannedTensor]:
    reader = plan.models[0].reader
    planned = []
    placed: set[int] = set()
    for job in plan.jobs:
        layer = moe_names.get(job.name)
        if layer is None:
            planned.append(job.output)
            continue
        if layer.layer in placed:
            continue
        placed.add(layer.layer)
        for name in _output_expert_names(layer, count) + layer.router_tensors(reader.tensors):
            shape = _output_shape(layer, name, reader.tensors, count)
            planned.append(PlannedTensor(name, plan.out_dtype, shape))
    return planned


def _output_expert_names(layer: ExpertLayer, count: int) -> list[str]:
    roles = (*layer.input_roles, layer.output_role)
    if layer.fused:
        return [layer.fused_tensor(role) for role in roles]
    return [layer.expert_tensor(expert, role) for expert in range(count) for role in roles]


def _output_shape(layer: ExpertLayer, name: str, stored: dict, count: int) -> tuple[int, ...]:
    if name.startswith(layer.router_prefix) or layer.fused:
        return (count, *stored[name].shape[1:])
    return tuple(stored[name].shape)


def _read_experts(reader, layer: ExpertLayer, device: torch.device) -> tuple[list[dict[str, torch.Tensor]], tuple[str, ...], str]:
    """Read one layer's experts as role → matrix mappings, splitting a fused gate_up into gate and up."""
    if not layer.fused:
        roles = (*layer.input_roles, layer.output_role)
        experts = [{role: reader.read(layer.expert_tensor(expert, role)).to(device) for role in roles}
                   for expert in range(layer.num_experts)]
        return experts, layer.input_roles, layer.output_role
    gate_up = reader.read(layer.fused_tensor("gate_up_proj")).to(device)
    down = reader.read(layer.fused_tensor("down_proj")).to(device)
    gate, up = gate_up.chunk(2, dim=1)
    experts = [{"gate": gate[expert], "up": up[expert], "down": down[expert]} for expert in range(layer.num_experts)]
    return experts, _FUSED_INPUT_ROLES, "down"


def _merge_layer(method: str, reader, layer: ExpertLayer, groups: list[ExpertGroup], params: dict[str, Any],
                 compute_dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Return the merged experts and router of one layer under their output names."""
    experts, input_roles, output_role = _read_experts(reader, layer, device)
    if method == "sub_moe":
        merged = [_subspace_merge_group(experts, group, params, input_roles=input_roles, output_role=output_role,
                                        compute_dtype=compute_dtype) for group in groups]
        rule = params["router_row"]
    else:
        # The random baseline is plain averaging, so it skips the alignment as well.
        align = params["align"] and params["strategy"] == "mc_smoe"
        merged = [merge_group(experts, group, input_roles=input_roles, output_role=output_role, align=align,
                              compute_dtype=compute_dtype) for group in groups]
        rule = "weighted_mean" if params["strategy"] == "random_average" else params["router_row"]

    outputs: dict[str, torch.Tensor] = {}
    if layer.fused:
        outputs[layer.fused_tensor("gate_up_proj")] = torch.stack(
            [torch.cat([expert["gate"], expert["up"]], dim=0) for expert in merged])
        outputs[layer.fused_tensor("down_proj")] = torch.stack([expert["down"] for expert in merged])
    else:
        for index, expert in enumerate(merged):
            for role, tensor in expert.items():
                outputs[layer.expert_tensor(index, role)] = tensor
    for name in layer.router_tensors(reader.tensors):
        outputs[name] = router_rows(reader.read(name).to(device), groups, rule=rule, compute_dtype=compute_dtype)
    return outputs


def _subspace_merge_group(experts: list[dict[str, torch.Tensor]], group: ExpertGroup, params: dict[str, Any], *,
                          input_roles: tuple[str, ...], output_role: str,
                          compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Merge one cluster per weight type in its joint subspace, after optional neuron alignment."""
    members = [experts[member] for member in group.members]
    if params["align"] and len(members) > 1:
        dominant = {role: tensor.to(compute_dtype) for role, tensor in members[0].items()}
        aligned = [dominant]
        for expert in members[1:]:
            expert = {role: tensor.to(compute_dtype) for role, tensor in expert.items()}
            permutation = align_to(dominant, expert, input_roles=input_roles, output_role=output_role)
            aligned.append(permute_expert(expert, permutation, input_roles=input_roles, output_role=output_role))
        members = aligned
    return {role: subspace_merge([expert[role] for expert in members], group.weights, rank=params["rank"],
                                 compute_dtype=compute_dtype)
            for role in (*input_roles, output_role)}


def _similarity_report(routing: LayerRouting) -> dict[str, Any]:
    if routing.output_similarity is None:
        return {}
    return {"output_similarity": [[round(value, 4) for value in row] for row in routing.output_similarity.tolist()]}


def _checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise MergeValueError(f"tensor {name}: the merged values contain NaN or infinity",
                              hint="check that the input experts are finite")
    return tensor


def _groups_report(method: str, layers: list[ExpertLayer], routing: dict[int, LayerRouting],
                   groups: dict[int, list[ExpertGroup]], params: dict[str, Any]) -> dict[str, Any]:
    """Describe the merge per layer: each expert's usage, and each new expert's members and weights."""
    settings = ({"rank": params["rank"], "align": params["align"], "router_row": params["router_row"]}
                if method == "sub_moe"
                else {"strategy": params["strategy"], "router_row": params["router_row"]})
    return {
        "method": method,
        **settings,
        "layers": [
            {
                "layer": layer.layer,
                "block": layer.block,
                "calibration_tokens": routing[layer.layer].tokens,
                "usage": [round(value, 6) for value in routing[layer.layer].usage.tolist()],
                **_similarity_report(routing[layer.layer]),
                "experts": [{"members": list(group.members), "weights": [round(w, 6) for w in group.weights]}
                            for group in groups[layer.layer]],
            }
            for layer in layers
        ],
    }
