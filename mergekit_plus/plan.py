"""The plan: every output tensor with its inputs, operator and parameters, built from headers alone.

Every check that can run before the first write runs here. Inputs must be found and readable, with
valid shard headers. Every tensor must be present in every input with the same shape (shapes are
never broadcast) and a float dtype, and no input may be quantized. Method parameters must be valid
for every tensor, and the output folder must be writable.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergekit_plus import architecture
from mergekit_plus.errors import InputError, MergeError, RecipeError
from mergekit_plus.io.reader import CheckpointReader, TensorInfo
from mergekit_plus.io.sidefiles import (
    ADAPTER_WEIGHTS_FILE,
    adapter_base_path,
    adapter_differences,
    is_adapter_folder,
    read_adapter_config,
)
from mergekit_plus.io.sources import ModelSource, looks_like_hub_id, resolve_source
from mergekit_plus.io.vocab import read_vocabulary
from mergekit_plus.io.writer import CheckpointLayout, PlannedTensor, StagedOutput, plan_layout, plan_single_file
from mergekit_plus.methods import get_method
from mergekit_plus.methods.base import REQUIRED, MergeMethod, MergeTarget, ModelStatistics, TensorLayer
from mergekit_plus.methods.chunks import CHUNK_NUMEL
from mergekit_plus.recipe.params import resolve_tensor_parameters
from mergekit_plus.recipe.schema import Recipe
from mergekit_plus.recipe.validate import MERGEKIT_IGNORED_PARAMS
from mergekit_plus.sizes import format_size

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = frozenset(DTYPES.values())

# Tensor names that only quantized checkpoints have (GPTQ, AWQ, bitsandbytes, ...).
_QUANTIZED_MARKERS = ("qweight", "qzeros", "g_idx", ".absmax", ".quant_map", ".SCB", "weight_scale", "weight_packed")
_MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class InputModel:
    """A resolved input with its open reader. `index` is its position in `models`, or -1 for the base."""

    role: str
    index: int
    source: ModelSource
    reader: CheckpointReader
    prefix: str = ""
    """Prefix of this input's tensor names before the reference's names, empty when the names match.
    A `BertForSequenceClassification` fine-tune of a bare `BertModel` base has the prefix `bert.`."""

    def stored_name(self, name: str) -> str:
        return self.prefix + name

    @property
    def label(self) -> str:
        return f"base {self.source.label}" if self.role == "base" else f"model {self.source.label}"


@dataclass(frozen=True)
class TensorRead:
    """One tensor to read: from which input, under which stored name."""

    input: InputModel
    info: TensorInfo


@dataclass(frozen=True)
class TensorJob:
    """The recipe for one output tensor: `merge` runs the operator, `copy` stores one input's tensor."""

    name: str
    action: str
    output: PlannedTensor
    base: TensorRead | None = None
    models: tuple[TensorRead, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    model_params: tuple[Mapping[str, Any], ...] = ()
    seeds: tuple[int, ...] = ()
    row_maps: tuple[torch.Tensor, ...] | None = None
    """For vocabulary tensors under `tokenizer.vocab: align`: one map per read (base first), giving for
    each output row the input row that has the same token, or -1 where that input lacks the token."""
    layer: TensorLayer | None = None
    """The tensor's block, for a method with `layered=True` only."""

    @property
    def reads(self) -> tuple[TensorRead, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def input_bytes(self) -> int:
        return sum(read.info.nbytes for read in self.reads)


@dataclass(frozen=True)
class StatisticsPlan:
    """The method's whole-model statistics: passes that read every merged tensor before the merge pass."""

    purpose: str
    max_passes: int
    read_bytes: int
    """Bytes read by one pass: the inputs of every merged tensor."""
    memory_bytes: int
    """An upper bound on the reducer's own memory during a pass."""
    start: Callable[[], ModelStatistics]
    """Return a fresh reducer, for one run."""


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    method: MergeMethod
    base: InputModel | None
    models: tuple[InputModel, ...]
    reference: InputModel
    tokenizer_source: ModelSource
    jobs: tuple[TensorJob, ...]
    dropped: tuple[tuple[str, str], ...]
    layout: CheckpointLayout
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    output: Path | None
    staged: StagedOutput | None
    config: dict[str, Any] | None
    peak_bytes_estimate: int
    statistics: StatisticsPlan | None = None
    adapter: ModelSource | None = None
    """For PEFT adapter inputs: the input whose adapter_config.json the output adapter copies."""
    learning: Any = None
    """For a method that learns its coefficients from the recipe's `data:` (AdaMerging): the phase that runs
    before the merge and returns this plan with the coefficients filled in."""
    learned: Any = None
    """The coefficients that the learning phase set, written next to the merged weights."""

    @property
    def inputs(self) -> tuple[InputModel, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models


class _Problems:
    """Problems found while planning, grouped so one cause over many tensors reads as one line."""

    def __init__(self) -> None:
        self._by_message: dict[str, list[str]] = defaultdict(list)
        self.hints: list[str] = []

    def add(self, message: str, tensor: str | None = None, hint: str | None = None) -> None:
        self._by_message[message].append(tensor or "")
        if hint and hint not in self.hints:
            self.hints.append(hint)

    def __bool__(self) -> bool:
        return bool(self._by_message)

    def lines(self) -> list[str]:
        lines = []
        for message, tensors in self._by_message.items():
            named = [t for t in tensors if t]
            if len(named) > 1:
                shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
                lines.append(f"{message} (tensors: {shown})")
            elif named:
                lines.append(f"tensor {named[0]}: {message}")
            else:
                lines.append(message)
        return lines

    def raise_as(self, error_type: type[MergeError]) -> None:
        lines = self.lines()
        shown = lines[:_MAX_PROBLEMS_SHOWN]
        if len(lines) > len(shown):
            shown.append(f"... and {len(lines) - len(shown)} more problems")
        message = shown[0] if len(shown) == 1 else f"{len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in shown)
        if error_type is RecipeError:
            raise RecipeError(shown)
        raise error_type(message, hint="\n  fix: ".join(self.hints) or None)


def derive_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """Derive a 63-bit seed from only the recipe seed, the tensor name and the model's position."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_plan(recipe: Recipe, *, output: str | Path | None = None, overwrite: bool = False,
               require_output: bool = True) -> Plan:
    """Resolve the inputs, read their headers and plan every output tensor. Raise before any write.

    `require_output=False` plans without an output folder, for `merge validate` and `merge plan`.
    """
    method = get_method(recipe.merge_method)
    if method is None:  # the recipe validation already rejects this; kept for plans built in code
        raise RecipeError([f"unknown merge method `{recipe.merge_method}`"])
    if getattr(method, "output_kind", "checkpoint") == "bundle" and recipe.vocab_policy == "align":
        raise RecipeError([f"`{method.name}` does not support `tokenizer.vocab: align`: a task mask over rows that "
                           "some inputs lack has no meaning in the bundle; merge checkpoints with the same "
                           "vocabulary (`vocab: strict`)"])

    # 1. The output folder, checked first: it costs nothing and spares reading headers for nothing.
    chosen = output or recipe.output.path
    output_path = Path(chosen) if chosen else None
    staged = None
    if output_path is not None:
        staged = StagedOutput(output_path, overwrite=overwrite or recipe.output.overwrite)
        staged.check()
    elif require_output:
        raise RecipeError(["no output folder: add `output: {path: FOLDER}` to the recipe or pass --output FOLDER"])

    # 2. Inputs: resolve every source and read every header, reporting all broken inputs together.
    base, models, tokenizer_source = _open_inputs(recipe)
    folds_adapter = getattr(method, "folds_adapter", None)
    folding = folds_adapter is not None and folds_adapter(recipe)
    adapter = _adapter_source(recipe, method, base, models, folding=folding)
    fold_base = None
    if adapter is not None and folding:
        # The adapter tensors are averaged among themselves as without `fold`. The base, the recipe's
        # or else the one that the adapter config names, only receives the averaged update.
        fold_base = base if base is not None else _open_adapter_base(models[0])
        base = None
    fill_model_parameters = getattr(method, "fill_model_parameters", None)
    if fill_model_parameters is not None:
        # Per-model values that the inputs' own files provide (MWA's training metrics), before any tensor is planned.
        recipe = fill_model_parameters(recipe, [(m.index, m.source.label, m.source.folder) for m in models])
    if output_path is not None:
        _check_output_is_not_an_input(output_path, [i.source for i in (base, fold_base, *models) if i is not None])
    _check_not_quantized([i for i in (base, fold_base, *models) if i is not None])

    # 3. Tensors: the output keeps the reference's tensors, less heads that the config ties.
    reference = base if base is not None else models[0]
    models = [_with_task_model_prefix(model, reference) for model in models]
    config = reference.reader.config
    compute_dtype = DTYPES[recipe.dtype]
    out_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else _dominant_float_dtype(reference)
    _warn_about_mergekit_differences(recipe, out_dtype)
    alignment = None
    if recipe.vocab_policy == "align":
        source_input = next(i for i in (base, *models) if i is not None and i.source is tokenizer_source)
        alignment = VocabAlignment.build([i for i in (base, *models) if i is not None], source_input)
    jobs, dropped = _plan_tensors(recipe, method, base, models, reference, out_dtype, alignment)
    if alignment is not None and config is not None:
        vocab_rows = [job.output.shape[0] for job in jobs if job.row_maps is not None]
        if vocab_rows:
            config = {**config, "vocab_size": vocab_rows[0]}

    # 4. Whole-model statistics, shards and memory.
    statistics = _plan_statistics(method, jobs, compute_dtype)
    if adapter is not None:
        layout = _adapter_layout(recipe, [job.output for job in jobs])
    else:
        layout = plan_layout([job.output for job in jobs], max_shard_bytes=recipe.shard_size_bytes,
                             metadata={"format": "pt"})
    if staged is not None:
        staged.check_free_space(layout.total_size)
    peak_bytes = estimate_peak_bytes(jobs, compute_dtype,
                                     statistics_bytes=statistics.memory_bytes if statistics else None)
    plan = Plan(recipe=recipe, method=method, base=base, models=tuple(models), reference=reference,
                tokenizer_source=tokenizer_source, jobs=tuple(jobs), dropped=tuple(dropped), layout=layout,
                compute_dtype=compute_dtype, out_dtype=out_dtype, output=output_path, staged=staged,
                config=config, peak_bytes_estimate=peak_bytes, statistics=statistics,
                adapter=adapter)
    if folding:
        plan = method.plan_fold(recipe, plan, fold_base)
        jobs, dropped, layout, peak_bytes = plan.jobs, plan.dropped, plan.layout, plan.peak_bytes_estimate
    plan_learning = getattr(method, "plan_learning", None)
    if plan_learning is not None:
        learning = plan_learning(recipe, plan)
        if learning is not None:
            # A learning phase keeps whole models in memory (AdaMerging the base and every task vector),
            # far more than the streamed tensors.
            plan = replace(plan, learning=learning,
                           peak_bytes_estimate=max(peak_bytes, learning.memory_bytes))
            if learning.memory_bytes:
                logger.info("%s learns before the merge, holding about %s of %s", method.name,
                            format_size(learning.memory_bytes),
                            getattr(learning, "memory_contents", "base and task vectors"))
    output_kind = getattr(method, "output_kind", "checkpoint")
    if output_kind == "checkpoint":
        logger.info("planned %d tensors (%d dropped) into %d file(s), %s; tensors in flight need about %s",
                    len(jobs), len(dropped), len(layout.shards), format_size(layout.total_size),
                    format_size(plan.peak_bytes_estimate))
    else:
        # A bundle or an expert merge lays out its own files when it runs; `merge plan` shows them.
        logger.info("planned %d input tensors (%d dropped) for the %s output; tensors in flight need about %s",
                    len(jobs), len(dropped), "bundle" if output_kind == "bundle" else "expert-merged",
                    format_size(plan.peak_bytes_estimate))
    if statistics is not None:
        logger.info("%s reads the merged tensors' inputs (%s) up to %d more times before merging, for %s",
                    method.name, format_size(statistics.read_bytes), statistics.max_passes, statistics.purpose)
    return plan


def merge_targets(jobs: list[TensorJob]) -> list[MergeTarget]:
    """Describe the merged tensors of a plan as a method's whole-model hooks see them."""
    return [MergeTarget(job.name, job.params, job.model_params, _model_numel(job), job.layer)
            for job in jobs if job.action == "merge"]


def _model_numel(job: TensorJob) -> tuple[int, ...]:
    """Count the entries of each model's task vector in a merged tensor: the rows that the model and the base hold."""
    numel = math.prod(job.output.shape)
    if job.row_maps is None:
        return (numel,) * len(job.models)
    row_size = math.prod(job.output.shape[1:])
    model_maps = job.row_maps[1:] if job.base is not None else job.row_maps
    counts = []
    for row_map in model_maps:
        present = row_map >= 0
        if job.base is not None:
            present &= job.row_maps[0] >= 0
        counts.append(int(present.sum()) * row_size)
    return tuple(counts)


def _plan_statistics(method: MergeMethod, jobs: list[TensorJob], compute_dtype: torch.dtype) -> StatisticsPlan | None:
    """Plan the method's whole-model statistics passes, or return None when its parameters need none."""
    if method.statistics is None:
        return None
    targets = merge_targets(jobs)
    reducer = method.statistics(targets, compute_dtype)
    if reducer is None:
        return None
    return StatisticsPlan(purpose=reducer.purpose, max_passes=reducer.max_passes,
                          read_bytes=sum(job.input_bytes for job in jobs if job.action == "merge"),
                          memory_bytes=reducer.memory_bytes,
                          start=functools.partial(method.statistics, targets, compute_dtype))


def _warn_about_mergekit_differences(recipe: Recipe, out_dtype: torch.dtype) -> None:
    """Log where a mergekit recipe means something else here, so no setting is ignored silently."""
    if "dtype" in recipe.model_fields_set and recipe.out_dtype is None and DTYPES[recipe.dtype] != out_dtype:
        logger.warning("`dtype: %s` sets only the compute dtype here; the output is stored as %s like the base. "
                       "Add `out_dtype: %s` to store it as mergekit would.", recipe.dtype, DTYPE_NAMES[out_dtype],
                       recipe.dtype)
    given = set(recipe.parameters).union(*(model.parameters for model in recipe.models))
    if recipe.merge_method == "ties" and "scope" not in given:
        logger.info("ties trims each task vector over the whole model (`scope: model`, as in the paper); "
                    "mergekit trims per tensor. Add `scope: tensor` to the parameters for mergekit's result.")
    for name in sorted(given & set(MERGEKIT_IGNORED_PARAMS)):
        logger.warning("`%s`: %s", name, MERGEKIT_IGNORED_PARAMS[name])


def estimate_peak_bytes(jobs: list[TensorJob], compute_dtype: torch.dtype, prefetch: int = 2, *,
                        statistics_bytes: int | None = None) -> int:
    """Estimate an upper bound on the memory of the tensors in flight, in bytes; shards are never buffered.

    The largest job keeps its raw reads, its result in the compute dtype and that result converted
    to the stored dtype. The operators work in fixed chunks, whose buffers are small and counted
    per input. The reads of the jobs being prefetched come on top. A statistics pass
    (`statistics_bytes` given) holds no result but the reducer's state, so the estimate is the
    larger of the two passes.
    """
    if not jobs:
        return 0
    largest = max(jobs, key=lambda job: job.output.nbytes)
    numel = largest.output.nbytes // largest.output.dtype.itemsize
    working = largest.input_bytes + numel * compute_dtype.itemsize + largest.output.nbytes
    chunk_buffers = CHUNK_NUMEL * compute_dtype.itemsize * (len(largest.reads) + 4)
    prefetched = sum(sorted((job.input_bytes for job in jobs), reverse=True)[:prefetch])
    merge_pass = working + chunk_buffers + prefetched
    if statistics_bytes is None:
        return merge_pass
    largest_reads = max(job.input_bytes for job in jobs)
    return max(merge_pass, largest_reads + chunk_buffers + prefetched + statistics_bytes)


def _with_task_model_prefix(model: InputModel, reference: InputModel) -> InputModel:
    """Find the prefix under which `model` stores every tensor of `reference`, for a task model of a bare base.

    A fine-tune saved with a task head (`BertForSequenceClassification`, say) stores the encoder as
    `bert.*` beside `classifier.*`, while its pretrained base is a bare `BertModel`. The prefix is
    taken only when the names do not match as they are and one first name component covers them all.
    """
    names, ref_names = set(model.reader.tensors), set(reference.reader.tensors)
    if model is reference or ref_names <= names or not ref_names:
        return model
    first_parts = {name.split(".", 1)[0] for name in names if "." in name}
    for part in sorted(first_parts):
        prefix = part + "."
        if all(prefix + name in names for name in ref_names):
            logger.info("%s stores the reference's tensors under `%s`; the tensors outside it are left out",
                        model.label, prefix)
            return replace(model, prefix=prefix)
    return model


def _open_inputs(recipe: Recipe) -> tuple[InputModel | None, list[InputModel], ModelSource]:
    problems = _Problems()
    opened: list[InputModel | None] = []
    specs: list[tuple[str, int, str, str | None]] = []
    if recipe.base_model is not None:
        specs.append(("base", -1, recipe.base_model.model, recipe.base_model.revision))
    specs += [("model", index, spec.model, spec.revision) for index, spec in enumerate(recipe.models)]

    for role, index, reference, revision in specs:
        key = "base_model" if role == "base" else f"models[{index}].model"
        try:
            source = resolve_source(reference, revision)
            opened.append(InputModel(role, index, source, CheckpointReader(source)))
        except InputError as exc:
            problems.add(f"{key}: {exc.message}", hint=exc.hint)
            opened.append(None)
    if problems:
        problems.raise_as(InputError)

    base = opened[0] if recipe.base_model is not None else None
    models = [m for m in opened if m is not None and m.role == "model"]
    name = recipe.tokenizer_source_name
    if name == "base":
        tokenizer_source = (base or models[0]).source
    else:
        tokenizer_source = next(m.source for m in models if recipe.models[m.index].model == name)
    return base, models, tokenizer_source


def _adapter_source(recipe: Recipe, method: MergeMethod, base: InputModel | None,
                    models: list[InputModel], *, folding: bool = False) -> ModelSource | None:
    """Return the first model's source when the models are PEFT adapters of one base, else None.

    Adapter tensors are merged among themselves, so a base model (unless `folding`, where it is the
    model that receives the merged adapter), a mix of adapters and full checkpoints, or adapters of
    different shapes or bases are rejected here.
    """
    adapters = [model for model in models if is_adapter_folder(model.source.folder)]
    if not adapters:
        return None
    hint = "merge checkpoints of one PEFT run: LoRA adapters with the same settings and base model"
    if len(adapters) != len(models):
        full = next(model for model in models if model not in adapters)
        raise InputError(f"{adapters[0].label} is a PEFT adapter but {full.label} is a full checkpoint; "
                         "the inputs must all be adapters or all full checkpoints", hint=hint)
    if base is not None and not folding:
        raise InputError(f"the models are PEFT adapters, which `{method.name}` cannot merge with base_model "
                         f"{base.source.label}: adapter tensors are averaged among themselves",
                         hint="remove `base_model` and use a method without a base model (mwa or linear), or "
                              "set `fold: true` under an `mwa` merge's parameters to fold the result into it")
    configs = [read_adapter_config(model.source.folder) for model in models]
    reference_base = adapter_base_path(models[0].source.folder, configs[0])
    for model, config in zip(models[1:], configs[1:]):
        differences = adapter_differences(configs[0], config)
        other_base = adapter_base_path(model.source.folder, config)
        if other_base != reference_base:
            differences.append(f"base model {other_base!r} vs {reference_base!r}")
        if differences:
            raise InputError(f"adapter {model.label} differs from {models[0].label}: {'; '.join(differences)}",
                             hint=hint)
    if str(configs[0].get("peft_type", "")).upper() != "LORA":
        raise InputError(f"{models[0].label} is a {configs[0].get('peft_type')!r} adapter; only LoRA adapters "
                         "are supported", hint=hint)
    return models[0].source


def _open_adapter_base(adapter: InputModel) -> InputModel:
    """Open the base model that a PEFT adapter's config names, to fold a merged adapter into.

    A relative `base_model_name_or_path` is resolved from the adapter's folder (the zoo writes
    `../../base`). Raise InputError when the config names no base or the base cannot be found.
    """
    folder = adapter.source.folder
    config = read_adapter_config(folder)
    named = config.get("base_model_name_or_path")
    reference = adapter_base_path(folder, config)
    hint = "set `base_model:` in the recipe to the folder or Hub repo of the base the adapters were trained on"
    if reference is None:
        raise InputError(f"cannot fold the merged adapter: {adapter.label} names no base model (its "
                         "adapter_config.json has no `base_model_name_or_path`)", hint=hint)
    if reference == named and not Path(named).is_absolute() and not looks_like_hub_id(named):
        raise InputError(f"cannot fold the merged adapter: {adapter.label} names the base model {named!r}, "
                         f"which is not a folder relative to {folder}", hint=hint)
    try:
        source = resolve_source(reference, config.get("revision"))
        return InputModel("base", -1, source, CheckpointReader(source))
    except InputError as exc:
        raise InputError(f"cannot fold the merged adapter into {named!r}, the base model that {adapter.label} "
                         f"names: {exc.message}", hint=hint) from exc


def _adapter_layout(recipe: Recipe, tensors: list[PlannedTensor]) -> CheckpointLayout:
    """Lay out an adapter as the one file that peft loads; reject a shard size it does not fit in."""
    layout = plan_single_file(tensors, file_name=ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    if layout.total_size > recipe.shard_size_bytes:
        raise RecipeError([f"output.shard_size: the merged adapter needs {format_size(layout.total_size)} in one "
                           f"file ({ADAPTER_WEIGHTS_FILE}, which peft loads without an index), more than "
                           f"`shard_size: {recipe.output.shard_size}`; raise or remove `shard_size`"])
    return layout


def _check_output_is_not_an_input(output: Path, sources: list[ModelSource]) -> None:
    target = output.resolve()
    for source in sources:
        folder = source.folder.resolve()
        if folder == target or target in folder.parents:
            raise InputError(f"output folder {output} would replace input {source.reference}",
                             hint="choose an output folder outside every input")


def _check_not_quantized(inputs: list[InputModel]) -> None:
    problems = _Problems()
    hint = "merge the unquantized (float) checkpoints, then quantize the result"
    for model in inputs:
        config = model.reader.config or {}
        quantization = config.get("quantization_config")
        if quantization:
            kind = quantization.get("quant_method", "unknown method") if isinstance(quantization, dict) else "unknown"
            problems.add(f"{model.label} is quantized (config.json has quantization_config, {kind})", hint=hint)
            continue
        evidence = _quantized_tensor(model.reader)
        if evidence is not None:
            problems.add(f"{model.label} is quantized: {evidence}", hint=hint)
    if problems:
        problems.raise_as(InputError)


def _quantized_tensor(reader: CheckpointReader) -> str | None:
    """Describe the tensor that shows a checkpoint is quantized: an integer weight first, else a packed name."""
    for name, info in reader.tensors.items():
        if info.dtype not in FLOAT_DTYPES and name.endswith(".weight"):
            return f"tensor {name} is {str(info.dtype).removeprefix('torch.')}"
    for name in reader.tensors:
        if any(marker in name for marker in _QUANTIZED_MARKERS):
            return f"tensor {name} is a quantization tensor"
    return None


def _dominant_float_dtype(model: InputModel) -> torch.dtype:
    counts: Counter[torch.dtype] = Counter()
    for info in model.reader.tensors.values():
        if info.dtype in FLOAT_DTYPES:
            counts[info.dtype] += info.nbytes
    return counts.most_common(1)[0][0] if counts else torch.float32


def _head_alias(reader: CheckpointReader, name: str) -> str | None:
    """For a tied input without a stored head, the embedding that transformers uses as its head."""
    if not architecture.is_head(name) or name in reader.tensors:
        return None
    if architecture.tied_head_names(reader.config, reader.tensors):
        embeddings = [n for n in reader.tensors if architecture.is_vocab_tensor(n) and not architecture.is_head(n)]
        if len(embeddings) == 1:
            return embeddings[0]
    return None


def _plan_tensors(recipe: Recipe, method: MergeMethod, base: InputModel | None, models: list[InputModel],
                  reference: InputModel, out_dtype: torch.dtype,
                  alignment: VocabAlignment | None) -> tuple[list[TensorJob], list[tuple[str, str]]]:
    problems = _Problems()
    param_problems = _Problems()
    ref_names = set(reference.reader.tensors)
    tied = architecture.tied_head_names(reference.reader.config, ref_names)
    dropped = [(name, "tied to the input embedding by tie_word_embeddings in the output config")
               for name in sorted(tied & ref_names)]

    # Tensors an input has beyond the reference would be lost silently; report them. A task model's
    # head (outside its prefix) is the one exception: it belongs to that task, so it stays out.
    for model in [m for m in (base, *models) if m is not None and m is not reference]:
        for stored in sorted(model.reader.tensors):
            if model.prefix and not stored.startswith(model.prefix):
                dropped.append((stored, f"task head of {model.label}, kept out of the merge"))
                continue
            name = stored.removeprefix(model.prefix)
            if name not in ref_names and name not in tied:
                problems.add(f"present in {model.label} but not in {reference.label}", stored,
                             hint="merge checkpoints of the same architecture and size")

    num_layers = architecture.count_layers(reference.reader.config, ref_names)
    if method.layered:
        for message in architecture.find_block_problems(reference.reader.config, ref_names - tied):
            problems.add(message, hint=f"`{method.name}` scales each tensor by its block index, so it needs a model "
                                       "whose blocks the toolkit can find; choose another merge method for this one")
    jobs: list[TensorJob] = []
    for name in sorted(ref_names - tied, key=architecture.sort_key):
        info = reference.reader.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            jobs.append(TensorJob(name, "copy", PlannedTensor(name, info.dtype, info.shape),
                                  models=(TensorRead(reference, info),)))
            continue
        aligned = alignment is not None and architecture.is_vocab_tensor(name)
        reads = _gather_reads(name, info, models, reference, problems, rows_may_differ=aligned)
        base_read = TensorRead(base, base.reader.tensors[name]) if method.requires_base and base else None
        if reads is None:
            continue
        shape = info.shape
        row_maps = None
        if aligned:
            all_reads = ([base_read] if base_read else []) + reads
            shape = (alignment.output_rows(name), *info.shape[1:])
            row_maps = tuple(alignment.row_map(read.input, read.info.shape[0], shape[0]) for read in all_reads)
        position = architecture.layer_position(name, num_layers)
        params, model_params = resolve_tensor_parameters(
            method, recipe.parameters, [recipe.models[m.index].parameters for m in models], name, position)
        _check_params(method, params, model_params, name, param_problems)
        seeds = tuple(derive_seed(recipe.seed, name, m.index) for m in models) if method.randomized else ()
        layer = TensorLayer(architecture.layer_index(name), num_layers) if method.layered else None
        jobs.append(TensorJob(name, "merge", PlannedTensor(name, out_dtype, shape), base=base_read,
                              models=tuple(reads), params=params, model_params=tuple(model_params), seeds=seeds,
                              row_maps=row_maps, layer=layer))
    if problems:
        problems.raise_as(InputError)
    if method.check_model is not None:
        for message in method.check_model(merge_targets(jobs)):
            param_problems.add(message)
    if param_problems:
        param_problems.raise_as(RecipeError)
    return jobs, dropped


def _gather_reads(name: str, ref_info: TensorInfo, inputs: list[InputModel], reference: InputModel,
                  problems: _Problems, *, rows_may_differ: bool = False) -> list[TensorRead] | None:
    reads: list[TensorRead] = []
    ok = True
    for model in inputs:
        stored = model.stored_name(name)
        if stored not in model.reader.tensors:
            stored = _head_alias(model.reader, name)
        if stored is None:
            problems.add(f"missing from {model.label} (present in {reference.label})", name,
                         hint="merge checkpoints of the same architecture")
            ok = False
            continue
        info = model.reader.tensors[stored]
        same_shape = info.shape[1:] == ref_info.shape[1:] if rows_may_differ else info.shape == ref_info.shape
        if not same_shape:
            _report_shape_mismatch(name, info, model, ref_info, reference, problems)
            ok = False
            continue
        if info.dtype not in FLOAT_DTYPES:
            problems.add(f"is {info.dtype} in {model.label} but floating-point in {reference.label}", name)
            ok = False
            continue
        reads.append(TensorRead(model, info))
    return reads if ok else None


def _report_shape_mismatch(name: str, info: TensorInfo, model: InputModel, ref_info: TensorInfo,
                           reference: InputModel, problems: _Problems) -> None:
    shapes = f"shape {list(info.shape)} in {model.label} but {list(ref_info.shape)} in {reference.label}"
    if architecture.is_vocab_tensor(name) and info.shape[1:] == ref_info.shape[1:]:
        problems.add(
            f"{shapes}: the vocabularies differ ({info.shape[0]} vs {ref_info.shape[0]} tokens)", name,
            hint="to match embedding rows by token, set `tokenizer: {source: MODEL, vocab: align}` with MODEL "
                 "the input whose tokenizer contains every input's tokens (usually the largest vocabulary)")
    else:
        problems.add(f"{shapes}; shapes must match exactly (they are never broadcast)", name,
                     hint="merge checkpoints of the same architecture and size")


def _check_params(method: MergeMethod, params: Mapping[str, Any], model_params: list[dict[str, Any]],
                  name: str, problems: _Problems) -> None:
    for key, value in params.items():
        if value is REQUIRED:
            problems.add(f"method `{method.name}` needs parameter `{key}`; set it under `parameters:`")
    for values in model_params:
        for key, value in values.items():
            if value is REQUIRED:
                problems.add(f"method `{method.name}` needs `{key}` for every model; set it under each "
                             "model's `parameters:` or in the top-level `parameters:`")
    if method.check is not None:
        for message in method.check(params, model_params):
            problems.add(message, name)


class VocabAlignment:
    """Matches the embedding and head rows of every input to the tokenizer source's vocabulary by token."""

    def __init__(self, source: InputModel, vocabularies: dict[int, dict[str, int]]) -> None:
        self.source = source
        self._vocabularies = vocabularies
        source_vocabulary = vocabularies[id(source)]
        size = max(source_vocabulary.values(), default=-1) + 1
        self._source_tokens: list[str | None] = [None] * size
        for token, index in source_vocabulary.items():
            self._source_tokens[index] = token

    @classmethod
    def build(cls, inputs: list[InputModel], source: InputModel) -> VocabAlignment:
        """Read every input's vocabulary; raise InputError if the source lacks a token of another input."""
        vocabularies = {id(model): read_vocabulary(model.source) for model in inputs}
        source_tokens = vocabularies[id(source)]
        problems = _Problems()
        for model in inputs:
            missing = [token for token in vocabularies[id(model)] if token not in source_tokens]
            if missing:
                shown = ", ".join(repr(token) for token in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                problems.add(f"the tokenizer source {source.source.label} lacks {len(missing)} tokens of "
                             f"{model.label}: {shown}{more}",
                             hint="choose as `tokenizer.source` an input whose vocabulary contains every input's tokens")
        if problems:
            problems.raise_as(InputError)
        return cls(source, vocabularies)

    def output_rows(self, tensor_name: str) -> int:
        """Return the row count of an output vocabulary tensor: the tokenizer source's own row count."""
        stored = self.source.reader.tensors.get(tensor_name)
        if stored is None:
            alias = _head_alias(self.source.reader, tensor_name)
            stored = self.source.reader.tensors[alias] if alias else None
        return stored.shape[0] if stored is not None else len(self._source_tokens)

    def row_map(self, model: InputModel, input_rows: int, output_rows: int) -> torch.Tensor:
        """Map each output row to the row of `model` that has the same token, or to -1.

        Rows past the source's vocabulary (padding rows) match by position when `model` has such
        a row and no token of its own sits there.
        """
        vocabulary = self._vocabularies[id(model)]
        used_rows = set(vocabulary.values())
        mapping = torch.full((output_rows,), -1, dtype=torch.int64)
        for row in range(output_rows):
            token = self._source_tokens[row] if row < len(self._source_tokens) else None
            if token is not None:
                found = vocabulary.get(token)
                if found is not None and found < input_rows:
                    mapping[row] = found
            elif row < input_rows and row not in used_rows:
                mapping[row] = row
        return mapping

