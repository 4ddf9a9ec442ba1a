"""The executor: streams the plan tensor by tensor, reading ahead while the current tensor merges.

It knows no method's math. It reads, moves the inputs to the device in their stored dtype and calls
the method's operator, which computes in the compute dtype chunk by chunk. Then it checks the result,
converts it to the stored dtype and hands the tensor to the shard writer.

A method with whole-model statistics gets statistics passes first: each one streams the inputs of
every merged tensor through the method's reducer in the same way, and writes nothing.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mergekit_plus.errors import MergeError, MergeValueError, OutputError
from mergekit_plus.io.sidefiles import (
    InputRecord,
    copy_tokenizer_files,
    write_adapter_config,
    write_config,
    write_model_card,
    write_recipe_copy,
)
from mergekit_plus.io.writer import ShardWriter
from mergekit_plus.methods.base import ModelStatistics
from mergekit_plus.plan import DTYPE_NAMES, Plan, TensorJob
from mergekit_plus.sizes import format_size

logger = logging.getLogger(__name__)

PREFETCH_JOBS = 2


@dataclass(frozen=True)
class MergeSummary:
    output: Path
    files: tuple[str, ...]
    tensors: int
    total_bytes: int
    seconds: float
    storage: dict[str, Any] | None = None
    """For a bundle output (`tall_masks`): its weight bytes, the inputs' weight bytes, their ratio and the floor."""


def select_device(name: str) -> torch.device:
    """Turn `cpu`, `cuda`, `cuda:N` or `auto` into a device, checking that it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MergeError(f"unknown device {name!r}", hint="use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(f"device {name!r} requested but CUDA is not available in this torch build or machine",
                             hint="use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MergeError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA devices found",
                             hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise MergeError(f"device type {device.type!r} is not supported", hint="use cpu, cuda, cuda:N or auto")
    return device


def run_plan(plan: Plan, *, recipe_data: dict[str, Any], device: str = "cpu", progress: bool = True) -> MergeSummary:
    """Merge every tensor of `plan` into a staging folder, add the side files, then move it into place."""
    if plan.staged is None or plan.output is None:
        raise ValueError("run_plan needs a plan built with an output folder")
    if getattr(plan.method, "output_kind", "checkpoint") == "bundle":
        from mergekit_plus.io.bundle import run_bundle

        return run_bundle(plan, recipe_data=recipe_data, device=device, progress=progress)
    if getattr(plan.method, "output_kind", "checkpoint") == "moe":
        from mergekit_plus.moe.execute import run_moe

        return run_moe(plan, recipe_data=recipe_data, device=device, progress=progress)
    target = select_device(device)
    started = time.perf_counter()
    # A learning phase and whole-model statistics come before the staging folder: they only read, so an
    # interrupted or failed pass leaves nothing behind.
    if plan.learning is not None:
        plan = plan.learning.run(plan, device=target, progress=progress)
    statistics = _gather_statistics(plan, target, progress=progress) if plan.statistics is not None else None
    with _writing(plan.output):
        staging = plan.staged.begin()
    writer = ShardWriter(staging, plan.layout)
    try:
        # 1. Tensors, in plan order, with reads running ahead of the merge.
        with _writing(plan.output):
            writer.open()
        with tqdm(total=plan.layout.total_size, unit="B", unit_scale=True, desc="merging",
                  disable=not progress, leave=False) as bar:
            for job, tensors in _prefetched(plan.jobs):
                result = _run_job(plan, job, tensors, target, statistics)
                with _writing(plan.output):
                    writer.write(job.name, result)
                bar.update(job.output.nbytes)
                logger.debug("%s: %s %s", job.name, job.action, list(job.output.shape))

        # 2. Side files, after the weights so a failed merge spends no time on them.
        with _writing(plan.output):
            files = writer.finish()
            files += _write_side_files(plan, staging, recipe_data)
            if plan.learned is not None:
                files += _write_learned(plan.learned, staging)

            # 3. Only now does anything appear under the output name.
            plan.staged.commit()
    except BaseException:
        writer.close()
        plan.staged.abort()
        raise

    seconds = time.perf_counter() - started
    logger.debug("wrote %d tensors in %d file(s) to %s in %.1f s", len(plan.jobs), len(plan.layout.shards),
                 plan.output, seconds)
    return MergeSummary(plan.output, tuple(files), len(plan.jobs), plan.layout.total_size, seconds)


def _write_learned(learned: Any, folder: Path) -> list[str]:
    """Write what a learning phase found next to the weights: through its own `write_files`, else as AdaMerging's."""
    write_files = getattr(learned, "write_files", None)
    if write_files is not None:
        return write_files(folder)
    from mergekit_plus.learn.adamerging import write_coefficients

    return write_coefficients(learned, folder)


def _gather_statistics(plan: Plan, device: torch.device, *, progress: bool) -> tuple[Any, ...]:
    """Run the method's statistics passes over the inputs of every merged tensor; return its result."""
    statistics = plan.statistics.start()
    merge_jobs = tuple(job for job in plan.jobs if job.action == "merge")
    number = 0
    while not statistics.done:
        number += 1
        started = time.perf_counter()
        logger.info("statistics pass %d (at most %d) for %s: reading %s", number, plan.statistics.max_passes,
                    plan.statistics.purpose, format_size(plan.statistics.read_bytes))
        with tqdm(total=plan.statistics.read_bytes, unit="B", unit_scale=True, desc=f"statistics pass {number}",
                  disable=not progress, leave=False) as bar:
            for job, tensors in _prefetched(merge_jobs):
                # The first pass checks the inputs, so that a broken one stops the run before the
                # remaining passes. The merge pass checks them again.
                _update_statistics(statistics, job, tensors, device, check_inputs=number == 1)
                bar.update(job.input_bytes)
        statistics.finish_pass()
        logger.info("statistics pass %d done in %.1f s", number, time.perf_counter() - started)
    for model, line in zip(plan.models, statistics.describe()):
        logger.info("%s: %s", model.label, line)
    return statistics.result()


def _update_statistics(statistics: ModelStatistics, job: TensorJob, tensors: list[torch.Tensor],
                       device: torch.device, *, check_inputs: bool) -> None:
    if check_inputs:
        for read, tensor in zip(job.reads, tensors):
            _check_finite_input(job.name, read.input.label, tensor)
    moved = [tensor.to(device=device) for tensor in tensors]
    if job.row_maps is not None:
        for group in _row_groups(job, moved):
            if group.merged_by_operator:
                statistics.update(job.name, group.base, group.models, models=group.positions, params=job.params,
                                  model_params=[job.model_params[position] for position in group.positions])
        return
    base = moved[0] if job.base is not None else None
    models = moved[1:] if job.base is not None else moved
    statistics.update(job.name, base, models, models=range(len(models)), params=job.params,
                      model_params=job.model_params)


def _statistics_argument(statistics: Any, positions: Sequence[int]) -> dict[str, Any]:
    """Return the operator's `statistics` keyword for the models at `positions`, or none without statistics.

    A result is a tuple with one entry per model, or an object whose `for_models(positions)`
    selects its per-model part and keeps what the models share.
    """
    if statistics is None:
        return {}
    for_models = getattr(statistics, "for_models", None)
    if for_models is not None:
        return {"statistics": for_models(positions)}
    return {"statistics": tuple(statistics[position] for position in positions)}


def _layer_argument(job: TensorJob) -> dict[str, Any]:
    """Return the operator's `layer` keyword for a method that takes it, else nothing."""
    return {} if job.layer is None else {"layer": job.layer}


def _write_side_files(plan: Plan, staging: Path, recipe_data: dict[str, Any]) -> list[str]:
    files = []
    out_dtype_name = DTYPE_NAMES[plan.out_dtype]
    if write_config(staging, plan.config, out_dtype=out_dtype_name):
        files.append("config.json")
    if plan.adapter is not None:
        write_adapter_config(staging, plan.adapter.folder, output=plan.output)
        files.append("adapter_config.json")
    copied = copy_tokenizer_files(staging, plan.tokenizer_source)
    write_model_card(
        staging, method_title=plan.method.title, method_name=plan.method.name, paper=plan.method.paper,
        inputs=[InputRecord(i.role, i.source) for i in plan.inputs], recipe_data=recipe_data,
        seed=plan.recipe.seed, compute_dtype=plan.recipe.dtype, out_dtype=out_dtype_name,
        tokenizer_source=plan.tokenizer_source, copied_files=copied, parameters=_effective_parameters(plan),
        library_name="peft" if plan.adapter is not None else "transformers")
    write_recipe_copy(staging, recipe_data)
    return files + copied + ["README.md", "merge_recipe.yaml"]


def _effective_parameters(plan: Plan) -> dict[str, Any]:
    """Return the method's parameters as the merge used them: recipe values, else the method's defaults."""
    recipe = plan.recipe
    merged = {p.name: recipe.parameters.get(p.name, p.default) for p in plan.method.global_params}
    per_model = [
        {p.name: model.parameters.get(p.name, recipe.parameters.get(p.name, p.default)) for p in plan.method.model_params}
        for model in recipe.models
    ]
    entries = [{"model": model.model, **values} for model, values in zip(recipe.models, per_model)]
    model_weights = getattr(plan.method, "model_weights", None)
    if model_weights is not None:
        # Methods that derive each model's weight from its parameters (mwa) record the weights used.
        for entry, weight in zip(entries, model_weights(merged, per_model)):
            entry["merge_weight"] = round(weight, 8)
    return {"method": plan.method.name, "parameters": merged, "models": entries}


@contextmanager
def _writing(output: Path):
    """Turn an OSError while writing the output (disk full, permissions) into an OutputError."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or output
        hint = ("free space on that disk, or choose an output folder on another disk" if exc.errno == errno.ENOSPC
                else "check that the output's parent folder exists and is writable, or choose another folder")
        raise OutputError(f"writing the output {output} failed: {exc.strerror or exc} ({where})", hint=hint) from exc


def _read_job(job: TensorJob) -> list[torch.Tensor]:
    return [read.input.reader.read(read.info.name) for read in job.reads]


def _prefetched(jobs: tuple[TensorJob, ...]):
    """Yield (job, its input tensors), keeping the reads of the next jobs in flight."""
    with ThreadPoolExecutor(max_workers=PREFETCH_JOBS, thread_name_prefix="read") as pool:
        pending: deque[tuple[TensorJob, Future[list[torch.Tensor]]]] = deque()
        upcoming = iter(jobs)
        for job in upcoming:
            pending.append((job, pool.submit(_read_job, job)))
            if len(pending) > PREFETCH_JOBS:
                break
        while pending:
            job, future = pending.popleft()
            next_job = next(upcoming, None)
            if next_job is not None:
                pending.append((next_job, pool.submit(_read_job, next_job)))
            yield job, future.result()


def _run_job(plan: Plan, job: TensorJob, tensors: list[torch.Tensor], device: torch.device,
             statistics: tuple[Any, ...] | None) -> torch.Tensor:
    if job.action == "copy":
        return tensors[0]

    for read, tensor in zip(job.reads, tensors):
        _check_finite_input(job.name, read.input.label, tensor)
    # Inputs stay in their stored dtype: the operator converts them to the compute dtype chunk by
    # chunk, so no whole-tensor converted copies exist.
    moved = [tensor.to(device=device) for tensor in tensors]
    if job.row_maps is not None:
        result = _merge_aligned_rows(plan, job, moved, statistics)
    else:
        base = moved[0] if job.base is not None else None
        models = moved[1:] if job.base is not None else moved
        result = plan.method.operator(base, models, params=job.params, model_params=job.model_params,
                                      seeds=job.seeds, compute_dtype=plan.compute_dtype,
                                      **_statistics_argument(statistics, range(len(models))),
                                      **_layer_argument(job))
        del base, models
    del moved

    result = _fit_to_dtype(job.name, result, plan.out_dtype, clamp=plan.recipe.output.clamp_out_of_range)
    return result.to(device="cpu", dtype=plan.out_dtype)


@dataclass(frozen=True)
class _RowGroup:
    """The rows of a vocabulary tensor whose token the same inputs hold, gathered from those inputs."""

    rows: torch.Tensor
    base: torch.Tensor | None
    """The base's rows, or None where the base lacks them or the method takes no base."""
    models: list[torch.Tensor]
    positions: list[int]
    """The position in the recipe of the model of each entry of `models`."""
    base_lacks_rows: bool

    @property
    def merged_by_operator(self) -> bool:
        """Whether the method's operator merges these rows, rather than a mean or a copy of the base."""
        return not self.base_lacks_rows and bool(self.models)


def _row_groups(job: TensorJob, tensors: list[torch.Tensor]) -> Iterator[_RowGroup]:
    """Group the rows of a vocabulary tensor by which inputs hold their token (base first in `tensors`)."""
    device = tensors[0].device
    maps = [row_map.to(device) for row_map in job.row_maps]
    has_base = job.base is not None
    present = torch.stack([row_map >= 0 for row_map in maps]).to(torch.int64)
    shifts = torch.arange(len(maps), device=device).unsqueeze(1)
    codes = (present << shifts).sum(0)

    for code in torch.unique(codes).tolist():
        rows = (codes == code).nonzero().squeeze(1)
        members = [index for index in range(len(maps)) if code >> index & 1]
        gathered = {index: tensors[index][maps[index][rows]] for index in members}
        model_members = [index for index in members if not (has_base and index == 0)]
        base_present = has_base and 0 in members
        yield _RowGroup(rows=rows, base=gathered[0] if base_present else None,
                        models=[gathered[index] for index in model_members],
                        positions=[index - 1 if has_base else index for index in model_members],
                        base_lacks_rows=has_base and not base_present)


def _merge_aligned_rows(plan: Plan, job: TensorJob, tensors: list[torch.Tensor],
                        statistics: tuple[Any, ...] | None) -> torch.Tensor:
    """Merge a vocabulary tensor whose inputs hold different sets of tokens.

    Rows are grouped by which inputs hold their token, and each group is merged from those inputs
    alone. Rows that the base lacks (added tokens) are the mean of the models that hold them, so a
    token added by one model keeps that model's row. Rows that only the base has keep the base row.
    The inputs are in their stored dtypes, and the result is in the compute dtype.
    """
    compute_dtype = plan.compute_dtype
    result = torch.empty(job.output.shape, dtype=compute_dtype, device=tensors[0].device)

    for group in _row_groups(job, tensors):
        if group.base_lacks_rows:
            result[group.rows] = torch.stack([model.to(compute_dtype) for model in group.models]).mean(0)
        elif not group.models:
            result[group.rows] = group.base.to(compute_dtype)
        else:
            result[group.rows] = plan.method.operator(
                group.base,
                group.models,
                params=job.params,
                model_params=[job.model_params[position] for position in group.positions],
                seeds=[job.seeds[position] for position in group.positions] if job.seeds else (),
                compute_dtype=compute_dtype,
                **_statistics_argument(statistics, group.positions),
                **_layer_argument(job),
            )
    return result


def _value_range(tensor: torch.Tensor) -> tuple[float, float]:
    """Return (min, max) of a non-empty float tensor in one pass; a NaN or infinity shows in either."""
    low, high = torch.aminmax(tensor)
    return float(low), float(high)


def _check_finite_input(name: str, label: str, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0 or all(math.isfinite(bound) for bound in _value_range(tensor)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise MergeValueError(f"tensor {name}: {label} contains {bad} NaN or infinite values",
                          hint="that input is broken; fix or download it again before merging")


def _fit_to_dtype(name: str, result: torch.Tensor, out_dtype: torch.dtype, *, clamp: bool) -> torch.Tensor:
    if result.numel() == 0:
        return result
    low, high = _value_range(result)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise MergeValueError(f"tensor {name}: the merged values contain NaN or infinity",
                              hint="check the method's parameters (weights, lambda) for this tensor")
    largest = max(-low, high)
    limit = torch.finfo(out_dtype).max
    if largest <= limit:
        return result
    if clamp:
        logger.warning("tensor %s: clamped values up to %.4g to the %s range (±%.4g)", name, largest,
                       DTYPE_NAMES.get(out_dtype, out_dtype), limit)
        return result.clamp(-limit, limit)
    raise MergeValueError(
        f"tensor {name}: largest merged magnitude {largest:.6g} exceeds the {DTYPE_NAMES.get(out_dtype, out_dtype)} "
        f"maximum {limit:.6g}",
        hint="store a wider dtype (`out_dtype: bfloat16` or `float32`), lower the weights, or set "
             "`output.clamp_out_of_range: true` to clamp")
