"""The TALL-masks bundle: θ₀, τ_MTL and one bit-packed mask per task in one folder, and its extraction.

A bundle folder contains:

- safetensors shards written by the shard writer (`model.safetensors`, or numbered shards with an
  index), whose tensor names carry a kind prefix:
  `base/NAME` (θ₀, in the output dtype), `tau/NAME` (τ_MTL, in the output dtype),
  `mask/TASK/NAME` (m_t, 1-D uint8, `numpy.packbits` order over the flattened tensor, last byte
  padded with zero bits) and `head/TASK/NAME` (a task's own head, such as a classifier, as stored);
- `tasks/TASK/`: that task's config.json, tokenizer and generation files, copied byte for byte;
- `bundle.json`: the manifest (format version, tasks with their sources, λ_t, heads and the λ_t
  selection scores, the tensor list with shapes and dtypes, the storage ratio);
- `merge_recipe.yaml`: the recipe, as for `merge run`.

With a `data:` section, a selection phase runs before the bundle pass: for each task it scores
θ₀ + m_t(λ) ⊙ τ_MTL on the task's labelled rows, for every λ of `lambda_grid` where `mask_lambda`
is `auto` and for the given λ_t elsewhere, and keeps the best λ.

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
from dataclasses import dataclass, replace
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
from mergekit_plus.errors import InputError, OutputError, RecipeError
from mergekit_plus.io.reader import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES, CheckpointReader, TensorInfo
from mergekit_plus.io.sidefiles import TOKENIZER_FILES, write_config, write_recipe_copy
from mergekit_plus.io.sources import ModelSource
from mergekit_plus.io.writer import CheckpointLayout, PlannedTensor, ShardWriter, StagedOutput, plan_layout
from mergekit_plus.learn.data import task_of_model
from mergekit_plus.methods.chunks import TaskVectors
from mergekit_plus.methods.tall_masks import (
    AUTO,
    DEFAULT_MASK_LAMBDA,
    apply_mask,
    bundle_entry,
    multi_task_vector,
    packed_size,
    parse_lambda_grid,
    rebuild_task,
    searched_models,
    select_lambda,
)
from mergekit_plus.plan import DTYPE_NAMES, DTYPES, InputModel, Plan, TensorJob, merge_targets
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
    """Name each task after the last part of its label, made unique and safe as a folder name."""
    names: list[str] = []
    for index, label in enumerate(labels):
        stem = _TASK_NAME.sub("_", label.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]).strip("._") or "task"
        name = stem
        if name in names:
            name = f"{stem}-{index}"
        names.append(name)
    return names


# The bundle's contents, for `merge plan` and `merge run`


@dataclass(frozen=True)
class BundleOutline:
    """The contents of a bundle plan: the task names, their heads, the shard layout and the storage figures."""

    tasks: list[str]
    heads: list[list[str]]
    layout: CheckpointLayout
    storage: StorageReport
    per_task_models: bool
    task_model_bytes: list[int]
    """The weight bytes of each task's rebuilt model, as `merge extract` writes it."""

    @property
    def total_bytes(self) -> int:
        """The weight bytes written: the bundle's, plus every rebuilt task model with `per_task_models`."""
        return self.layout.total_size + (sum(self.task_model_bytes) if self.per_task_models else 0)


def bundle_outline(plan: Plan) -> BundleOutline:
    """Lay out the bundle of `plan` from the headers alone."""
    # Tasks take the names that the recipe's `data:` section uses: `task:`, else the folder name less `ft-`.
    tasks = task_names([task_of_model(spec.model, spec.task) for spec in plan.recipe.models])
    heads = _task_heads(plan)
    layout = plan_layout(_planned_tensors(plan, tasks, heads), max_shard_bytes=plan.recipe.shard_size_bytes,
                         metadata={"format": "pt", "content": FORMAT_NAME})
    storage = StorageReport(layout.total_size, _inputs_weight_bytes(plan), len(tasks), plan.out_dtype.itemsize * 8)
    per_task_models = any(job.action == "merge" and job.params["per_task_models"] for job in plan.jobs)
    shared = sum(plan.out_dtype.itemsize * math.prod(job.output.shape) if job.action == "merge"
                 else job.output.nbytes for job in plan.jobs)
    task_model_bytes = [shared + sum(model.reader.tensors[name].nbytes for name in names)
                        for model, names in zip(plan.models, heads)]
    return BundleOutline(tasks, heads, layout, storage, per_task_models, task_model_bytes)


def describe_bundle(plan: Plan) -> dict[str, Any]:
    """Describe, as plain data, the bundle that `merge run` writes for `plan` and how it sets each λ_t."""
    outline = bundle_outline(plan)
    selection = plan.learning if isinstance(plan.learning, LambdaSelection) else None
    data = {entry.position: entry for entry in selection.tasks} if selection is not None else {}
    tasks = []
    for position, (task, model) in enumerate(zip(outline.tasks, plan.models)):
        mask_lambda = _task_lambda(plan, position)
        entry = data.get(position)
        tasks.append({
            "name": task, "source": model.source.label, "mask_lambda": mask_lambda, "heads": outline.heads[position],
            "data": entry.path if entry else None, "examples": len(entry.examples) if entry else None,
            "metric": entry.metric if entry else None,
        })
    merged = [job for job in plan.jobs if job.action == "merge"]
    searched = selection is not None and any(entry.searched for entry in selection.tasks)
    return {
        "format": FORMAT_NAME,
        "tasks": tasks,
        "merged_tensors": len(merged),
        "copied_tensors": len(plan.jobs) - len(merged),
        "lambda_grid": list(selection.grid) if searched else None,
        "lambda_tie_break": selection.tie_break if searched else None,
        "weight_bytes": outline.layout.total_size,
        "shards": [{"file": shard.file_name, "bytes": shard.size, "tensors": len(shard.offsets)}
                   for shard in outline.layout.shards],
        "per_task_models": outline.per_task_models,
        "task_model_bytes": outline.task_model_bytes,
        "total_bytes": outline.total_bytes,
        "storage": outline.storage.to_dict(),
        "selection_memory_bytes": selection.memory_bytes if selection is not None else None,
    }


# Writing a bundle (called by `execute.run_plan` for a method with `output_kind == "bundle"`)


def run_bundle(plan: Plan, *, recipe_data: dict[str, Any], device: str = "cpu", progress: bool = True) -> MergeSummary:
    """Choose λ_t where asked, write the bundle of `plan` into a staging folder, then move it into place.

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
    outline = bundle_outline(plan)
    tasks, heads, layout = outline.tasks, outline.heads, outline.layout
    plan.staged.check_free_space(outline.total_bytes)
    started = time.perf_counter()

    # 2. Whole-model statistics (TIES thresholds with `inner: ties`, `scope: model`), read-only.
    statistics = _gather_statistics(plan, target, progress=progress) if plan.statistics is not None else None

    # 3. λ_t chosen on each task's data, read-only like the statistics.
    selections: list[dict[str, Any] | None] = [None] * len(tasks)
    if isinstance(plan.learning, LambdaSelection):
        plan, selections = run_lambda_selection(plan, plan.learning, statistics, target)

    with _writing(plan.output):
        staging = plan.staged.begin()
    writer = ShardWriter(staging, layout)
    kept = [0] * len(tasks)
    entries = 0
    try:
        # 4. Tensors: θ₀ and τ_MTL in the output dtype, then each task's packed mask.
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

        # 5. Side files per task, the manifest, and the optional rebuilt task models.
        with _writing(plan.output):
            files = writer.finish()
            storage = outline.storage
            task_records = []
            for index, (task, model, names) in enumerate(zip(tasks, plan.models, heads)):
                side_files = _copy_task_files(model.source, staging / TASKS_FOLDER / task)
                task_records.append({
                    "name": task, "source": model.source.label, "mask_lambda": _task_lambda(plan, index),
                    "prefix": model.prefix, "side_files": side_files,
                    "heads": [_tensor_record(model.reader.tensors[name]) for name in names],
                    "mask_fraction": kept[index] / entries if entries else 0.0,
                    "lambda_selection": selections[index]})
            manifest = _manifest(plan, task_records, storage)
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            write_recipe_copy(staging, recipe_data)
            files += [MANIFEST_NAME, "merge_recipe.yaml"]
            if outline.per_task_models:
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


# Choosing λ_t on each task's labelled data


@dataclass(frozen=True)
class TaskData:
    """One task's labelled rows for the λ_t selection, read and checked when the plan is built."""

    position: int
    """The model's position in the plan's models."""
    task: str
    """The task's key in the recipe's `data:`."""
    path: str
    kind: str
    """`causal_lm` or `sequence_classification`, from the task model's config."""
    metric: str
    examples: tuple[tuple[str, Any], ...]
    batch_size: int
    max_length: int
    tokenizer_folder: Path
    searched: bool
    """Whether `mask_lambda` is `auto` for some tensor of this model, so that the grid is searched."""


@dataclass(frozen=True)
class LambdaSelection:
    """The λ_t selection phase of a bundle plan: the grid, each task's data, and the memory it takes."""

    grid: tuple[float, ...]
    tie_break: str
    tasks: tuple[TaskData, ...]
    memory_bytes: int
    """τ_MTL of every merged tensor in the compute dtype, plus the largest task model in float32."""

    memory_contents = "τ_MTL and one task model (activations come on top)"
    """The contents of the memory estimate, for the plan's log."""


def plan_lambda_selection(recipe: Any, plan: Plan) -> LambdaSelection | None:
    """Return the λ_t selection phase of a tall_masks plan, or None when the recipe has no `data:`.

    Reads and checks every task's rows now, so that a bad data file stops the plan before any
    model loads. Raise RecipeError for `mask_lambda: auto` without `data:`, and InputError for
    rows that do not fit the task model or a task model that cannot be scored.
    """
    from mergekit_plus.zoo.evaluate import (
        METRICS,
        SEQUENCE_CLASSIFICATION,
        label_count,
        model_kind,
        read_labelled_examples,
    )

    merged = [job for job in plan.jobs if job.action == "merge"]
    searched = set(searched_models(merge_targets(list(plan.jobs))))
    data_tasks = [task_of_model(recipe.models[model.index].model, recipe.models[model.index].task)
                  for model in plan.models]
    if recipe.data is None:
        if searched:
            # With `data:`, the recipe validation requires an entry for every task, searched or not.
            needed = ", ".join(f"`{task}`" for task in data_tasks)
            raise RecipeError([f"`mask_lambda: auto` chooses λ_t on each task's labelled data, but the recipe has no "
                               f"`data:` section; add one with an entry for every task ({needed}), such as "
                               f"`{data_tasks[min(searched)]}: {{path: FILE}}`, or set `mask_lambda` to a number"])
        return None
    if not merged:
        return None

    params = merged[0].params
    tasks = []
    for position, (model, data_task) in enumerate(zip(plan.models, data_tasks)):
        entry = recipe.data.get(data_task)
        if entry is None:  # the recipe validation already rejects this; kept for plans built in code
            raise RecipeError([f"`data:` has no entry for task `{data_task}`; add one per model"])
        config = model.reader.config
        kind = model_kind(config)
        if kind is None:
            architectures = (config or {}).get("architectures")
            raise InputError(f"{model.label} cannot be scored on its data: its config.json names architectures "
                             f"{architectures!r}, and tall_masks scores causal LMs (…ForCausalLM) by exact match and "
                             "sequence classifiers (…ForSequenceClassification) by accuracy",
                             hint="remove `data:` and set each `mask_lambda` to a number")
        tokenizer_folder = _tokenizer_folder(model.source.folder, plan.tokenizer_source.folder)
        if tokenizer_folder is None:
            raise InputError(f"{model.label} cannot be scored on its data: neither it nor the tokenizer source "
                             f"{plan.tokenizer_source.label} has tokenizer files",
                             hint="save the task model's tokenizer beside it with `tokenizer.save_pretrained`")
        labels = label_count(config) if kind == SEQUENCE_CLASSIFICATION else None
        examples = read_labelled_examples(Path(entry.path), kind, samples=entry.samples, labels=labels)
        tasks.append(TaskData(position, data_task, entry.path, kind, METRICS[kind], tuple(examples), entry.batch_size,
                              entry.max_length, tokenizer_folder, position in searched))

    compute_bytes = sum(math.prod(job.output.shape) for job in merged) * plan.compute_dtype.itemsize
    model_bytes = max(sum(math.prod(info.shape) for info in model.reader.tensors.values()) * 4
                      for model in plan.models)
    grid = parse_lambda_grid(params["lambda_grid"])
    return LambdaSelection(grid, params["lambda_tie_break"], tuple(tasks), compute_bytes + model_bytes)


def _tokenizer_folder(model_folder: Path, source_folder: Path) -> Path | None:
    """Return the task model's folder when it has a tokenizer, else the tokenizer source's, else None."""
    for folder in (model_folder, source_folder):
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                       "tokenizer.model", "vocab.json")):
            return folder
    return None


def run_lambda_selection(plan: Plan, selection: LambdaSelection, statistics: tuple[Any, ...] | None,
                         device: torch.device) -> tuple[Plan, list[dict[str, Any] | None]]:
    """Score each task's rebuilt model on its data; return the plan with the chosen λ_t and one record per model.

    A model without data gets None. Only τ_MTL of every merged tensor and one task model are held at
    a time; θ₀ and θ_t are read again, tensor by tensor, for every λ.
    """
    from transformers import AutoTokenizer

    from mergekit_plus.zoo.evaluate import load_scoring_model, score_examples

    started = time.perf_counter()
    merged = tuple(job for job in plan.jobs if job.action == "merge")

    # 1. τ_MTL of every merged tensor, and its stored (clamped) form where clamping changes it.
    multi_task: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for job, tensors in _prefetched(merged):
        for read, tensor in zip(job.reads, tensors):
            _check_finite_input(job.name, read.input.label, tensor)
        moved = [tensor.to(device=device) for tensor in tensors]
        inputs = TaskVectors(moved[0], moved[1:], plan.compute_dtype)
        tau = multi_task_vector(inputs, job.params, job.model_params, statistics).view(inputs.shape)
        stored = _fit_to_dtype(job.name, tau, plan.out_dtype, clamp=plan.recipe.output.clamp_out_of_range)
        multi_task[job.name] = (tau, stored)

    # 2. Each task: its own model (config, head) with the rebuilt tensors written into it, scored per λ.
    # NOTE: only run on CPU so far; with `--device cuda` the model, τ_MTL and the batches go to the GPU.
    records: list[dict[str, Any] | None] = [None] * len(plan.models)
    chosen: dict[int, float] = {}
    for entry in selection.tasks:
        model = plan.models[entry.position]
        network = load_scoring_model(model.source.folder, entry.kind).to(device)
        tokenizer = AutoTokenizer.from_pretrained(entry.tokenizer_folder)
        state = _scoring_state(network, model, plan)

        def score(mask_lambda: float | None) -> int:
            _load_rebuilt_task(plan, model, entry.position, mask_lambda, multi_task, state, device)
            return score_examples(network, tokenizer, entry.examples, kind=entry.kind, batch_size=entry.batch_size,
                                  max_length=entry.max_length).correct

        if entry.searched:
            value, scores = select_lambda(selection.grid, score, tie_break=selection.tie_break)
            chosen[entry.position] = value
            picked = value
        else:
            fixed = _task_lambda(plan, entry.position)
            scores = [(fixed, score(None))]
            picked = fixed
        records[entry.position] = _selection_record(entry, scores, picked, selection.tie_break)
        logger.info("λ_t of %s on %s: %s; keeps %s", model.source.label, entry.path,
                    ", ".join(f"{value} → {correct}/{len(entry.examples)}" for value, correct in scores), picked)
        del network, state

    # 3. The bundle pass reads the chosen λ_t from each merged tensor's per-model parameters.
    jobs = []
    for job in plan.jobs:
        if job.action != "merge":
            jobs.append(job)
            continue
        model_params = tuple({**values, "mask_lambda": chosen[position]} if values["mask_lambda"] == AUTO else values
                             for position, values in enumerate(job.model_params))
        jobs.append(replace(job, model_params=model_params))
    logger.info("λ_t selection done in %.1f s", time.perf_counter() - started)
    return replace(plan, jobs=tuple(jobs), learned=records), records


def _scoring_state(network: torch.nn.Module, model: InputModel, plan: Plan) -> dict[str, torch.Tensor]:
    """Return the network's tensors by stored name, rejecting a merged tensor that the network lacks."""
    state = network.state_dict()
    missing = [model.prefix + job.name for job in plan.jobs
               if job.action == "merge" and model.prefix + job.name not in state]
    if missing:
        raise InputError(f"the transformers model of {model.label} has no tensor named {', '.join(missing[:3])}"
                         f"{' and more' if len(missing) > 3 else ''}, so its rebuilt tensors cannot be scored",
                         hint="merge checkpoints whose tensor names match their transformers class, or remove "
                              "`data:` and set each `mask_lambda` to a number")
    return state


@torch.no_grad()
def _load_rebuilt_task(plan: Plan, model: InputModel, position: int, mask_lambda: float | None,
                       multi_task: dict[str, tuple[torch.Tensor, torch.Tensor]], state: dict[str, torch.Tensor],
                       device: torch.device) -> None:
    """Write θ₀ + m_t ⊙ τ_MTL of every tensor into `state`, as `merge extract` stores it.

    `mask_lambda` replaces `auto`; a λ_t that the recipe gives is used as it is.
    """
    for job in plan.jobs:
        key = model.prefix + job.name
        if job.action == "copy":
            if key in state:
                state[key].copy_(job.models[0].input.reader.read(job.models[0].info.name))
            continue
        recipe_value = job.model_params[position]["mask_lambda"]
        value = mask_lambda if recipe_value == AUTO else recipe_value
        base = job.base.input.reader.read(job.base.info.name).to(device)
        task = job.models[position].input.reader.read(job.models[position].info.name).to(device)
        tau, stored = multi_task[job.name]
        rebuilt = rebuild_task(base, task, tau, value, compute_dtype=plan.compute_dtype, stored_dtype=plan.out_dtype,
                               stored_multi_task=stored)
        state[key].copy_(rebuilt.to(plan.out_dtype))


def _selection_record(entry: TaskData, scores: list[tuple[Any, int]], picked: Any, tie_break: str) -> dict[str, Any]:
    count = len(entry.examples)
    return {
        "data": entry.path, "metric": entry.metric, "examples": count, "searched": entry.searched,
        "tie_break": tie_break if entry.searched else None,
        "scores": [{"mask_lambda": value, "correct": correct, "accuracy": correct / count}
                   for value, correct in scores],
        "mask_lambda": picked,
    }


def format_lambda_table(task_records: Sequence[dict[str, Any]]) -> str | None:
    """Render each task's λ_t scores from the manifest's task records as a table, or None without any."""
    rows = [record for record in task_records if record.get("lambda_selection")]
    if not rows:
        return None
    grid: list[Any] = []
    for record in rows:
        selection = record["lambda_selection"]
        if selection["searched"]:
            grid += [item["mask_lambda"] for item in selection["scores"] if item["mask_lambda"] not in grid]
    width = max(len("task"), *(len(record["name"]) for record in rows))
    columns = [f"{value:>6}" for value in grid]
    lines = [f"{'task':<{width}}  " + "  ".join(columns) + ("  " if columns else "") + "   λ_t  accuracy  examples"]
    for record in rows:
        selection = record["lambda_selection"]
        by_value = {_lambda_key(item["mask_lambda"]): item["accuracy"] for item in selection["scores"]}
        cells = [f"{by_value[_lambda_key(value)]:6.3f}" if selection["searched"] else f"{'-':>6}" for value in grid]
        picked = selection["mask_lambda"]
        accuracy = by_value[_lambda_key(picked)]
        lambda_text = f"{picked}" if selection["searched"] else f"{picked} (given)"
        lines.append(f"{record['name']:<{width}}  " + "  ".join(cells) + ("  " if cells else "")
                     + f"{lambda_text:>6}  {accuracy:8.3f}  {selection['examples']:8d}")
    metric = rows[0]["lambda_selection"]["metric"]
    tie_break = next((record["lambda_selection"]["tie_break"] for record in rows
                      if record["lambda_selection"]["searched"]), None)
    note = {"nearest_default": f"; ties go to the λ nearest {DEFAULT_MASK_LAMBDA}",
            "first": "; ties go to the first λ of the grid"}.get(tie_break, "")
    return f"λ_t per task, scored by {metric} on each task's data{note}:\n" + "\n".join(lines)


def _lambda_key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


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
