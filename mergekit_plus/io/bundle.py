"""The TALL-masks bundle: θ₀, τ_MTL and one bit-packed mask per task in one folder, and its extraction.

A bundle folder contains:

- safetensors shards written by the shard writer (`model.safetensors`, or numbered shards with an
  index), whose tensor names carry a kind prefix:
  `base/NAME` (θ₀, in the output dtype), `tau/NAME` (τ_MTL, in the output dtype),
  `mask/TASK/NAME` (m_t, 1-D uint8, `numpy.packbits` order over the flattened tensor, last byte
  padded with zero bits) and `head/TASK/NAME` (a task's own head, such as a classifier, as stored);
- `tasks/TASK/`: that task's config.json, tokenizer and generation files, copied byte for byte;
- `bundle.json`: the manifest (format version, tasks with their sources, λ_t and heads, the tensor
  list with shapes and dtypes, the storage ratio);
- `merge_recipe.yaml`: the recipe, as for `merge run`.

`extract_task` rebuilds θ_t = θ₀ + m_t ⊙ τ_MTL of one task as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# `execute.run_plan` imports this module only when it runs a bundle method, so these imports make no cycle.
from mergekit_plus.execute import (
    MergeSummary,
    _check_finite_input,
    _fit_to_dtype,
    _gather_statistics,
    _prefetched,
    _writing,
    select_device,
)
from mergekit_plus.errors import InputError, OutputError
from mergekit_plus.io.reader import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES, CheckpointReader, TensorInfo
from mergekit_plus.io.sidefiles import TOKENIZER_FILES, write_config, write_recipe_copy
from mergekit_plus.io.sources import ModelSource
from mergekit_plus.io.writer import PlannedTensor, ShardWriter, StagedOutput, plan_layout
from mergekit_plus.methods.tall_masks import apply_mask, bundle_entry, packed_size
from mergekit_plus.plan import DTYPE_NAMES, DTYPES, Plan, TensorJob
from mergekit_plus.sizes import format_size

logger = logging.getLogger(__name__)

MANIFEST_NAME = "bundle.json"
FORMAT_NAME = "mergekit_plus.tall_masks"
FORMAT_VERSION = 1
TASKS_FOLDER = "tasks"
MODELS_FOLDER = "models"
MASK_BIT_ORDER = "numpy.packbits: flat row-major order, first entry in the most significant bit, zero padding"
_TASK_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def base_key(name: str) -> str:
    return f"base/{name}"


def tau_key(name: str) -> str:
    return f"tau/{name}"


def mask_key(task: str, name: str) -> str:
    return f"mask/{task}/{name}"


def head_key(task: str, name: str) -> str:
    return f"head/{task}/{name}"


@dataclass(frozen=True)
class StorageReport:
    """The bundle's weight bytes against the inputs', and the bit-packing floor."""

    bundle_bytes: int
    inputs_bytes: int
    tasks: int
    bits_per_weight: int

    @property
    def ratio(self) -> float:
        return self.bundle_bytes / self.inputs_bytes if self.inputs_bytes else float("nan")

    @property
    def floor(self) -> float:
        """(2 + T/b) / (T + 1): θ₀ and τ_MTL at b bits per weight plus T one-bit masks, over T + 1 checkpoints."""
        return (2 + self.tasks / self.bits_per_weight) / (self.tasks + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle_weight_bytes": self.bundle_bytes, "inputs_weight_bytes": self.inputs_bytes,
                "ratio": self.ratio, "floor": self.floor, "tasks": self.tasks,
                "bits_per_weight": self.bits_per_weight}

    def describe(self) -> str:
        return (f"storage: the bundle's weights take {format_size(self.bundle_bytes)}, {self.ratio:.4f} of the "
                f"{self.tasks + 1} input checkpoints' {format_size(self.inputs_bytes)}; the bit-packing floor "
                f"(2 + T/b)/(T + 1) with T = {self.tasks}, b = {self.bits_per_weight} is {self.floor:.4f}")


def task_names(labels: Sequence[str]) -> list[str]:
    """Name each task after the last part of its model reference, made unique and safe as a folder name."""
    names: list[str] = []
    for index, label in enumerate(labels):
        stem = _TASK_NAME.sub("_", label.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]).strip("._") or "task"
        name = stem
        if name in names:
            name = f"{stem}-{index}"
        names.append(name)
    return names


# Writing a bundle (called by `execute.run_plan` for a method with `output_kind == "bundle"`)


def run_bundle(plan: Plan, *, recipe_data: dict[str, Any], device: str = "cpu", progress: bool = True) -> MergeSummary:
    """Write the bundle of `plan` into a staging folder, then move it into place.

    It reads the inputs the way `execute.run_plan` does and shares its helpers, so the input checks,
    the statistics passes and the output errors are the same as for an ordinary merge.
    """
    # 1. Checks and the layout, before any pass reads a tensor.
    if plan.staged is None or plan.output is None:
        raise ValueError("run_bundle needs a plan built with an output folder")
    target = select_device(device)
    if any(job.row_maps is not None for job in plan.jobs):
        # The planner rejects `vocab: align` for bundle methods, so only a plan built in code gets here.
        raise ValueError("a tall_masks bundle cannot hold vocabulary tensors whose rows are matched by token")
    tasks = task_names([model.source.reference for model in plan.models])
    heads = _task_heads(plan)
    planned = _planned_tensors(plan, tasks, heads)
    layout = plan_layout(planned, max_shard_bytes=plan.recipe.shard_size_bytes,
                         metadata={"format": "pt", "content": FORMAT_NAME})
    plan.staged.check_free_space(layout.total_size)
    per_task_models = bool(plan.jobs and any(job.action == "merge" and job.params["per_task_models"]
                                             for job in plan.jobs))
    started = time.perf_counter()

    # 2. Whole-model statistics (TIES thresholds with `inner: ties`, `scope: model`), read-only.
    statistics = _gather_statistics(plan, target, progress=progress) if plan.statistics is not None else None

    with _writing(plan.output):
        staging = plan.staged.begin()
    writer = ShardWriter(staging, layout)
    kept = [0] * len(tasks)
    entries = 0
    try:
        # 3. Tensors: θ₀ and τ_MTL in the output dtype, then each task's packed mask.
        with _writing(plan.output):
            writer.open()
        with tqdm(total=layout.total_size, unit="B", unit_scale=True, desc="bundling", disable=not progress,
                  leave=False) as bar:
            for job, tensors in _prefetched(plan.jobs):
                if job.action == "copy":
                    with _writing(plan.output):
                        writer.write(base_key(job.name), tensors[0])
                    bar.update(tensors[0].nbytes)
                    continue
                job_kept = _write_merged_job(plan, job, tensors, tasks, writer, target, statistics)
                for index, count in enumerate(job_kept):
                    kept[index] += count
                numel = math.prod(job.output.shape)
                entries += numel
                bar.update(job.output.nbytes * 2 + len(tasks) * packed_size(numel))
            for task, model, names in zip(tasks, plan.models, heads):
                for stored in names:
                    with _writing(plan.output):
                        writer.write(head_key(task, stored), model.reader.read(stored))

        # 4. Side files per task, the manifest, and the optional rebuilt task models.
        with _writing(plan.output):
            files = writer.finish()
            storage = StorageReport(layout.total_size, _inputs_weight_bytes(plan), len(tasks),
                                    plan.out_dtype.itemsize * 8)
            task_records = []
            for index, (task, model, names) in enumerate(zip(tasks, plan.models, heads)):
                side_files = _copy_task_files(model.source, staging / TASKS_FOLDER / task)
                task_records.append({
                    "name": task, "source": model.source.label, "mask_lambda": _task_lambda(plan, index),
                    "prefix": model.prefix, "side_files": side_files,
                    "heads": [_tensor_record(model.reader.tensors[name]) for name in names],
                    "mask_fraction": kept[index] / entries if entries else 0.0})
            manifest = _manifest(plan, task_records, storage)
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            write_recipe_copy(staging, recipe_data)
            files += [MANIFEST_NAME, "merge_recipe.yaml"]
            if per_task_models:
                for task in tasks:
                    _extract_into(staging, manifest, task, staging / MODELS_FOLDER / task, target)
                files.append(f"{MODELS_FOLDER}/")
            plan.staged.commit()
    except BaseException:
        writer.close()
        plan.staged.abort()
        raise

    for task, record in zip(tasks, task_records):
        logger.info("task %s (%s): its mask keeps %.2f%% of %s merged entries", task, record["source"],
                    100 * record["mask_fraction"], f"{entries:,}")
    logger.info("%s", storage.describe())
    tensor_count = sum(len(shard.tensors) for shard in layout.shards)
    return MergeSummary(plan.output, tuple(files), tensor_count, layout.total_size, time.perf_counter() - started,
                        storage=storage.to_dict())


def _write_merged_job(plan: Plan, job: TensorJob, tensors: list[torch.Tensor], tasks: list[str], writer: ShardWriter,
                      device: torch.device, statistics: tuple[Any, ...] | None) -> tuple[int, ...]:
    """Write θ₀, τ_MTL and every task's packed mask of one merged tensor; return how many entries each mask keeps."""
    for read, tensor in zip(job.reads, tensors):
        _check_finite_input(job.name, read.input.label, tensor)
    moved = [tensor.to(device=device) for tensor in tensors]
    arguments = {} if statistics is None else {"statistics": statistics}
    entry = bundle_entry(moved[0], moved[1:], params=job.params, model_params=job.model_params,
                         compute_dtype=plan.compute_dtype, **arguments)
    base = _fit_to_dtype(job.name, moved[0].to(plan.compute_dtype), plan.out_dtype, clamp=False)
    multi_task = _fit_to_dtype(job.name, entry.multi_task, plan.out_dtype, clamp=plan.recipe.output.clamp_out_of_range)
    with _writing(plan.output):
        writer.write(base_key(job.name), base.to(device="cpu", dtype=plan.out_dtype))
        writer.write(tau_key(job.name), multi_task.to(device="cpu", dtype=plan.out_dtype))
        for task, packed in zip(tasks, entry.masks):
            writer.write(mask_key(task, job.name), packed.to("cpu"))
    logger.debug("%s: bundled %s", job.name, list(job.output.shape))
    return entry.kept


def _task_lambda(plan: Plan, index: int) -> float | list[float]:
    """Return the model's λ_t, or the distinct values in plan order where it varies by tensor."""
    values = []
    for job in plan.jobs:
        if job.action == "merge":
            value = job.model_params[index]["mask_lambda"]
            if value not in values:
                values.append(value)
    return values[0] if len(values) == 1 else values


def _task_heads(plan: Plan) -> list[list[str]]:
    """List each task model's own tensors outside its prefix (a classifier head), which stay out of the merge."""
    heads = []
    for model in plan.models:
        if not model.prefix:
            heads.append([])
            continue
        heads.append(sorted(name for name in model.reader.tensors if not name.startswith(model.prefix)))
    return heads


def _planned_tensors(plan: Plan, tasks: list[str], heads: list[list[str]]) -> list[PlannedTensor]:
    planned = []
    for job in plan.jobs:
        if job.action == "copy":
            planned.append(PlannedTensor(base_key(job.name), job.output.dtype, job.output.shape))
            continue
        numel = math.prod(job.output.shape)
        planned.append(PlannedTensor(base_key(job.name), plan.out_dtype, job.output.shape))
        planned.append(PlannedTensor(tau_key(job.name), plan.out_dtype, job.output.shape))
        planned += [PlannedTensor(mask_key(task, job.name), torch.uint8, (packed_size(numel),)) for task in tasks]
    for task, model, names in zip(tasks, plan.models, heads):
        for name in names:
            info = model.reader.tensors[name]
            planned.append(PlannedTensor(head_key(task, name), info.dtype, info.shape))
    return planned


def _inputs_weight_bytes(plan: Plan) -> int:
    return sum(info.nbytes for model in plan.inputs for info in model.reader.tensors.values())


def _copy_task_files(source: ModelSource, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("config.json", *TOKENIZER_FILES):
        path = source.folder / name
        if path.is_file():
            shutil.copyfile(path, folder / name)
            copied.append(name)
    return copied


def _tensor_record(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "dtype": DTYPE_TO_SAFETENSORS[info.dtype], "shape": list(info.shape)}


def _manifest(plan: Plan, task_records: list[dict[str, Any]], storage: StorageReport) -> dict[str, Any]:
    merged = next((job for job in plan.jobs if job.action == "merge"), None)
    inner = {} if merged is None else {key: value for key, value in merged.params.items()
                                       if key not in ("per_task_models",)}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": plan.method.name,
        "mask_bit_order": MASK_BIT_ORDER,
        "base": plan.base.source.label,
        "dtype": DTYPE_NAMES[plan.out_dtype],
        "compute_dtype": DTYPE_NAMES[plan.compute_dtype],
        "shard_size_bytes": plan.recipe.shard_size_bytes,
        "parameters": inner,
        "tasks": task_records,
        "tensors": [{"name": job.name, "kind": "merged" if job.action == "merge" else "copied",
                     "dtype": DTYPE_TO_SAFETENSORS[job.output.dtype], "shape": list(job.output.shape)}
                    for job in plan.jobs],
        "storage": storage.to_dict(),
    }


# Extracting one task


def read_manifest(bundle: Path) -> dict[str, Any]:
    """Read and check the bundle's manifest; raise InputError when the folder is not a bundle this code reads."""
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise InputError(f"bundle folder {bundle} not found", hint="pass the folder that `merge run` wrote for a "
                                                                   "tall_masks recipe")
    if not path.is_file():
        raise InputError(f"{bundle} is not a tall_masks bundle: {MANIFEST_NAME} is missing",
                         hint="pass the folder that `merge run` wrote for a tall_masks recipe")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read: {exc}", hint="write the bundle again with `merge run`") from exc
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
                         f"but this version reads {FORMAT_NAME!r} version {FORMAT_VERSION}",
                         hint="write the bundle again with this version's `merge run`")
    return manifest


def default_extract_output(bundle: Path, task: str) -> Path:
    """Return the folder that `merge extract` writes to without -o: BUNDLE-TASK beside the bundle."""
    return bundle.parent / f"{bundle.name}-{task}"


def extract_task(bundle: Path, task: str, output: Path | None = None, *, overwrite: bool = False,
                 device: str = "cpu") -> Path:
    """Rebuild θ_t = θ₀ + m_t ⊙ τ_MTL of `task` from `bundle` as a Hugging Face folder; return the folder."""
    manifest = read_manifest(bundle)
    names = [record["name"] for record in manifest["tasks"]]
    if task not in names:
        raise InputError(f"task {task!r} is not in the bundle {bundle}; its tasks are: {', '.join(names)}",
                         hint="pass one of those names to --task")
    target = select_device(device)
    output = output if output is not None else default_extract_output(bundle, task)
    staged = StagedOutput(output, overwrite=overwrite)
    try:
        staged.check()
    except OutputError as error:
        if output.exists() and not overwrite:
            error.hint = "pass --force to replace it, or choose another folder with -o"
        raise
    with _writing(output):
        staging = staged.begin()
    try:
        with _writing(output):
            _extract_into(bundle, manifest, task, staging, target)
            staged.commit()
    except BaseException:
        staged.abort()
        raise
    logger.info("extracted task %s from %s into %s", task, bundle, output)
    return output


def _extract_into(bundle: Path, manifest: dict[str, Any], task: str, folder: Path, device: torch.device) -> None:
    """Write the rebuilt task model into `folder`, streaming tensor by tensor."""
    # 1. Check the bundle's tensors against the manifest before writing anything.
    record = next(item for item in manifest["tasks"] if item["name"] == task)
    reader = CheckpointReader(ModelSource(str(bundle), bundle))
    out_dtype = DTYPES[manifest["dtype"]]
    compute_dtype = DTYPES[manifest["compute_dtype"]]
    planned = []
    missing = []
    for tensor in manifest["tensors"]:
        name, shape = tensor["name"], tuple(tensor["shape"])
        keys = [base_key(name)] if tensor["kind"] == "copied" else [base_key(name), tau_key(name),
                                                                    mask_key(task, name)]
        missing += [key for key in keys if key not in reader.tensors]
        planned.append(PlannedTensor(record["prefix"] + name, SAFETENSORS_DTYPES[tensor["dtype"]], shape))
    for head in record["heads"]:
        key = head_key(task, head["name"])
        if key not in reader.tensors:
            missing.append(key)
        planned.append(PlannedTensor(head["name"], SAFETENSORS_DTYPES[head["dtype"]], tuple(head["shape"])))
    if missing:
        raise InputError(f"the bundle {bundle} lacks {len(missing)} tensors that its manifest lists, e.g. "
                         f"{missing[0]}", hint="write the bundle again with `merge run`")
    layout = plan_layout(planned, max_shard_bytes=manifest["shard_size_bytes"], metadata={"format": "pt"})

    # 2. Tensors, one at a time.
    writer = ShardWriter(folder, layout)
    writer.open()
    try:
        for tensor in manifest["tensors"]:
            name = tensor["name"]
            base = reader.read(base_key(name))
            if tensor["kind"] == "merged":
                rebuilt = apply_mask(base.to(device), reader.read(tau_key(name)).to(device),
                                     reader.read(mask_key(task, name)).to(device), compute_dtype)
                base = rebuilt.to(device="cpu", dtype=out_dtype)
            writer.write(record["prefix"] + name, base)
        for head in record["heads"]:
            writer.write(head["name"], reader.read(head_key(task, head["name"])))
        writer.finish()
    finally:
        writer.close()

    # 3. The task's own config (dtype set to the stored one) and tokenizer files.
    side_folder = bundle / TASKS_FOLDER / task
    for name in record["side_files"]:
        if name == "config.json":
            config = json.loads((side_folder / name).read_text(encoding="utf-8"))
            write_config(folder, config, out_dtype=manifest["dtype"])
        else:
            shutil.copyfile(side_folder / name, folder / name)
