"""Human and JSON descriptions of a plan, for `merge plan`."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mergekit_plus.plan import DTYPE_NAMES, Plan
from mergekit_plus.sizes import format_size


def _dtype_name(dtype: Any) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def plan_summary(plan: Plan, *, with_tensors: bool = False) -> dict[str, Any]:
    """Return the plan as plain data (for --json)."""
    actions = Counter(job.action for job in plan.jobs)
    summary: dict[str, Any] = {
        "method": plan.method.name,
        "inputs": [
            {"role": i.role, "reference": i.source.reference, "folder": str(i.source.folder),
             "hub_id": i.source.hub_id, "commit": i.source.commit, "files": [f.name for f in i.reader.files],
             "tensors": len(i.reader.tensors)}
            for i in plan.inputs
        ],
        "output": str(plan.output) if plan.output else None,
        "shards": [{"file": s.file_name, "bytes": s.size, "tensors": len(s.offsets)} for s in plan.layout.shards],
        "total_bytes": plan.layout.total_size,
        "compute_dtype": _dtype_name(plan.compute_dtype),
        "out_dtype": _dtype_name(plan.out_dtype),
        "seed": plan.recipe.seed,
        "tensors": {"merge": actions.get("merge", 0), "copy": actions.get("copy", 0), "dropped": len(plan.dropped)},
        "dropped": [{"tensor": name, "reason": reason} for name, reason in plan.dropped],
        "tokenizer_source": plan.tokenizer_source.reference,
        "peak_memory_estimate_bytes": plan.peak_bytes_estimate,
        "statistics": None,
    }
    if plan.statistics is not None:
        summary["statistics"] = {"purpose": plan.statistics.purpose, "max_passes": plan.statistics.max_passes,
                                 "read_bytes_per_pass": plan.statistics.read_bytes}
    if _is_bundle(plan):
        from mergekit_plus.io.bundle import describe_bundle

        # A bundle is written instead of a checkpoint, so its layout replaces the checkpoint's.
        bundle = describe_bundle(plan)
        summary["bundle"] = bundle
        summary["shards"] = bundle["shards"]
        summary["total_bytes"] = bundle["total_bytes"]
    if getattr(plan.method, "output_kind", "checkpoint") == "moe":
        from mergekit_plus.moe.execute import describe_moe

        # Expert merging rewrites the MoE layers with fewer experts and copies everything else.
        moe = describe_moe(plan)
        summary["moe"] = moe
        summary["shards"] = moe["shards"]
        summary["total_bytes"] = moe["total_bytes"]
        summary["tensors"] = {"merge": moe["rewritten_out"], "copy": moe["copied"], "dropped": len(plan.dropped)}
        summary["peak_memory_estimate_bytes"] = max(plan.peak_bytes_estimate, moe["calibration_memory_bytes"])
    if with_tensors:
        summary["jobs"] = [
            {"tensor": job.name, "action": job.action, "shape": list(job.output.shape),
             "dtype": _dtype_name(job.output.dtype),
             "shard": plan.layout.shard_of(job.name).file_name,
             "reads": [f"{read.input.label}:{read.info.name}" for read in job.reads],
             "params": dict(job.params), "model_params": [dict(p) for p in job.model_params]}
            for job in plan.jobs
        ]
    return summary


def describe_plan(plan: Plan, *, with_tensors: bool = False) -> str:
    """Describe the plan as text: inputs, output, tensor counts, dropped tensors, memory."""
    summary = plan_summary(plan, with_tensors=with_tensors)
    lines = [f"method: {plan.method.name} ({plan.method.title})", "inputs:"]
    for item, model in zip(summary["inputs"], plan.inputs):
        pinned = f" @ {item['commit']}" if item["commit"] else ""
        size = sum(info.nbytes for info in model.reader.tensors.values())
        lines.append(f"  {item['role']:<5} {item['reference']}{pinned}  ({len(item['files'])} file(s), "
                     f"{item['tensors']} tensors, {format_size(size)})")
    counts = summary["tensors"]
    if "bundle" in summary:
        lines += _describe_bundle(summary)
    else:
        lines.append(
            f"output: {summary['output'] or '(none: set output.path, or pass -o to merge run)'}  ({len(summary['shards'])} "
            f"shard(s), {format_size(summary['total_bytes'])}, stored as {summary['out_dtype']}, computed in "
            f"{summary['compute_dtype']})")
    if "moe" in summary:
        moe = summary["moe"]
        before = "/".join(str(value) for value in moe["experts_before"])
        lines += [
            f"experts: {moe['layers']} MoE layer(s), {before} experts each → {moe['experts_after']}; their "
            f"{moe['rewritten_in']} expert and router tensors become {moe['rewritten_out']}",
            f"calibration: up to {moe['calibration_samples']} texts per file from {moe['calibration']}, through the "
            f"whole model in float32 ({format_size(moe['calibration_memory_bytes'])})",
            f"tensors: {counts['merge']} written by the expert merge, {counts['copy']} copied unchanged, "
            f"{counts['dropped']} dropped",
        ]
    else:
        lines.append(f"tensors: {counts['merge']} merged, {counts['copy']} copied from the base, "
                     f"{counts['dropped']} dropped")
    lines += [f"  dropped {item['tensor']}: {item['reason']}" for item in summary["dropped"]]
    lines += [
        f"tokenizer and side files from: {summary['tokenizer_source']}",
        f"seed: {summary['seed']}",
        f"peak memory estimate: {format_size(summary['peak_memory_estimate_bytes'])} for the tensors in flight "
        "(the Python process and torch add about 0.3 GB)",
    ]
    statistics = summary["statistics"]
    if statistics is not None:
        lines.append(f"extra passes: up to {statistics['max_passes']} statistics passes before the merge, each "
                     f"reading the merged tensors' inputs again ({format_size(statistics['read_bytes_per_pass'])}), "
                     f"for {statistics['purpose']}")
    if with_tensors:
        lines.append("tensors:")
        for job in summary["jobs"]:
            params = ", ".join(f"{k}={v}" for k, v in job["params"].items())
            per_model = "; ".join(", ".join(f"{k}={v}" for k, v in p.items()) for p in job["model_params"])
            line = f"  {job['tensor']} {job['shape']} {job['action']} -> {job['shard']}"
            if params:
                line += f"  [{params}]"
            if per_model:
                line += f"  models: [{per_model}]"
            lines.append(line)
    return "\n".join(lines)


BUNDLE_FILES_NOTE = "bundle.json (the manifest), tasks/TASK/ (each task's config and tokenizer), merge_recipe.yaml"


def _is_bundle(plan: Plan) -> bool:
    return getattr(plan.method, "output_kind", "checkpoint") == "bundle"


def _describe_bundle(summary: dict[str, Any]) -> list[str]:
    """Describe a tall_masks bundle: its contents, size, storage ratio and how each λ_t is set."""
    bundle = summary["bundle"]
    storage = bundle["storage"]
    tasks = bundle["tasks"]
    output = summary["output"] or "(none: set output.path, or pass -o to merge run)"
    lines = [
        f"output: {output}  (a tall_masks bundle, not a checkpoint: {len(bundle['shards'])} shard(s), "
        f"{format_size(bundle['weight_bytes'])} of tensors, stored as {summary['out_dtype']}, computed in "
        f"{summary['compute_dtype']})",
        f"  base/NAME: θ₀, {bundle['merged_tensors']} merged and {bundle['copied_tensors']} copied tensors",
        f"  tau/NAME: τ_MTL, {bundle['merged_tensors']} tensors",
        f"  mask/TASK/NAME: {len(tasks)} bit-packed masks, 1 bit per entry, for "
        + ", ".join(task["name"] for task in tasks),
    ]
    heads = [task for task in tasks if task["heads"]]
    if heads:
        lines.append("  head/TASK/NAME: the task heads of " + ", ".join(
            f"{task['name']} ({len(task['heads'])} tensors)" for task in heads))
    lines.append(f"  {BUNDLE_FILES_NOTE}")
    if bundle["per_task_models"]:
        lines.append(f"  models/TASK/: {len(tasks)} rebuilt task models (per_task_models), "
                     f"{format_size(sum(bundle['task_model_bytes']))} in all")

    lines.append(f"storage estimate: the bundle's tensors take {storage['ratio']:.4f} of the {storage['tasks'] + 1} "
                 f"input checkpoints' weight bytes; the bit-packing floor (2 + T/b)/(T + 1) is {storage['floor']:.4f}")

    lines.append("λ_t per task:")
    width = max(len(task["name"]) for task in tasks) if tasks else 0
    for task in tasks:
        if task["mask_lambda"] == "auto" or (isinstance(task["mask_lambda"], list) and "auto" in task["mask_lambda"]):
            grid = ", ".join(str(value) for value in bundle["lambda_grid"])
            choice = f"chosen from {grid} by {task['metric']} on {task['data']} ({task['examples']} examples)"
        else:
            choice = f"given, {task['mask_lambda']}"
            if task["data"] is not None:
                choice += f"; scored by {task['metric']} on {task['data']} ({task['examples']} examples)"
        lines.append(f"  {task['name']:<{width}}  {choice}")
    if bundle["lambda_tie_break"] == "nearest_default":
        lines.append("  of equally scoring λ, the one nearest 0.4 is kept (the smaller of two equally near)")
    elif bundle["lambda_tie_break"] == "first":
        lines.append("  of equally scoring λ, the first in `lambda_grid` order is kept")
    if bundle["selection_memory_bytes"] is not None:
        lines.append(f"  the selection keeps about {format_size(bundle['selection_memory_bytes'])} in memory "
                     "(τ_MTL and one task model) besides the activations")
    return lines
