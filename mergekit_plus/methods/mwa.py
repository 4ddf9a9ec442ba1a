"""Metrics-Weighted Averaging (MWA) of checkpoints of one training run.

Paper: Yu and Choi, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging",
arXiv:2504.18580 (2025).

Formula, per tensor, for checkpoints θ₁ … θ_N of one run with metric values m₁ … m_N and penalty p:

    θ = Σ wᵢ θᵢ        with Σ wᵢ = 1
    weighting power, metric loss:        wᵢ ∝ Lᵢ^(−p)      (lower training loss, more weight)
    weighting power, metric step:        wᵢ ∝ sᵢ^p         (later step, more weight)
    weighting exponential, metric loss:  wᵢ ∝ exp(−p·Lᵢ)

p = 0 gives the uniform average. As p grows the weight moves to the lowest-loss (or last) checkpoint.

NOTE: the abstract states only that one penalty factor shapes the weights whatever the number of
checkpoints. The method section of the paper could not be read, so neither weighting nor the
default p = 1 is confirmed. Both weightings match that description, and `weighting` chooses one.

Parameters:
    metric (default loss): `loss` or `step`.
    penalty (default 1.0): p ≥ 0.
    weighting (default power): `power` or `exponential`. `exponential` takes `metric: loss` only.
    fold (default false): for LoRA adapter inputs, write the base model with the averaged adapter
        folded in, a full checkpoint, instead of an adapter folder.
    loss, step (per model, default unset): the checkpoint's metric value. When the recipe leaves the
        chosen metric unset, the planner reads it from the checkpoint's `trainer_state.json`:
        `global_step` for `step`, and the `loss` of the last `log_history` entry that has one for `loss`.

The inputs are full checkpoints or PEFT LoRA adapter folders. Adapter tensors are averaged as
stored, lora_A and lora_B separately, which is what averaging adapter checkpoints does. That is
not the average of the updates ΔWᵢ = Bᵢ Aᵢ, because Σ wᵢ Bᵢ · Σ wᵢ Aᵢ ≠ Σ wᵢ Bᵢ Aᵢ in general.

With `fold: true`, every adapted module's base weight W becomes W + s·B̄Ā, with Ā = Σ wᵢ Aᵢ and
B̄ = Σ wᵢ Bᵢ, as peft's `merge_and_unload` computes it. The scale s is lora_alpha / r, or
lora_alpha / √r with rsLoRA, with r and lora_alpha taken per module from `rank_pattern` and
`alpha_pattern`. Embeddings and Conv1D layers (`fan_in_fan_out`) store W transposed, so they get
s·(B̄Ā)ᵀ. The base is the recipe's `base_model`, else the one that the adapter config names.

Not covered: metrics other than training loss and step (such as a validation score), weights that
vary by tensor, and folding convolution adapters or LoRA variants whose forward pass is not
W x + s·B A x (DoRA, LoRA biases, trained biases, `modules_to_save` and others that
`fold_config_problems` names).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergekit_plus.errors import InputError, RecipeError
from mergekit_plus.methods import linear
from mergekit_plus.methods.base import MergeMethod, MergeTarget, Param

logger = logging.getLogger(__name__)

METRICS = ("loss", "step")
TRAINER_STATE_FILE = "trainer_state.json"


# -- weights ----------------------------------------------------------------------------------------

def _power_logits(metric: str, penalty: float, values: Sequence[float]) -> list[float]:
    sign = -1.0 if metric == "loss" else 1.0
    return [sign * penalty * math.log(value) if value > 0 else -math.inf for value in values]


def _exponential_logits(metric: str, penalty: float, values: Sequence[float]) -> list[float]:
    return [-penalty * value for value in values]


# Each weighting returns log-weights up to a constant; `mwa_weights` normalises them.
WEIGHTINGS: dict[str, Callable[[str, float, Sequence[float]], list[float]]] = {
    "power": _power_logits,
    "exponential": _exponential_logits,
}
# The metrics each weighting is defined for. Checkpoint steps lie tens to thousands apart, so exp(p·s)
# would put all the weight on the last checkpoint for any p near 1. `exponential` takes the loss only.
WEIGHTING_METRICS = {"power": METRICS, "exponential": ("loss",)}


def mwa_weights(metric: str, penalty: float, values: Sequence[float], *, weighting: str = "power") -> list[float]:
    """Return the normalised MWA weights of checkpoints with these metric values.

    The weights are a softmax of the weighting's log-weights (∓p·log mᵢ for `power`, −p·Lᵢ for
    `exponential`) in float64, so a large p or a wide range of values neither overflows nor
    underflows to a zero sum. Under `power`, a step of 0 gets weight 0 when p > 0.
    """
    problem = weighting_problem(metric, weighting)
    if problem is not None:
        raise ValueError(problem)
    problems = metric_value_problems(metric, values, weighting=weighting)
    if problems:
        raise ValueError("; ".join(problems))
    if penalty == 0:
        return [1.0 / len(values)] * len(values)
    logits = WEIGHTINGS[weighting](metric, penalty, values)
    peak = max(logits)
    scaled = [math.exp(logit - peak) for logit in logits]
    total = math.fsum(scaled)
    return [value / total for value in scaled]


def weighting_problem(metric: str, weighting: str) -> str | None:
    """Describe why a metric and weighting cannot be combined, or return None when they can."""
    if metric not in METRICS:
        return f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}"
    if weighting not in WEIGHTINGS:
        return f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}"
    if metric not in WEIGHTING_METRICS[weighting]:
        return (f"`weighting: {weighting}` is defined for `metric: {' or '.join(WEIGHTING_METRICS[weighting])}` "
                f"only; set `weighting: power` to weight by {metric}")
    return None


def metric_value_problem(metric: str, value: Any, *, weighting: str = "power") -> str | None:
    """Describe why the weight formula cannot use one metric value, or return None when it can."""
    if value is None:
        return f"no `{metric}` value"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"`{metric}` {value!r} is not a finite number"
    if metric == "loss" and weighting == "power" and value <= 0:
        return f"`loss` {value} is not above 0, which the loss weight Lᵢ^(−p) needs"
    if metric == "step" and value < 0:
        return f"`step` {value} is negative"
    return None


def metric_value_problems(metric: str, values: Sequence[Any], *, weighting: str = "power") -> list[str]:
    """Describe the metric values that the weight formula cannot use, one sentence per model."""
    problems = []
    for index, value in enumerate(values):
        problem = metric_value_problem(metric, value, weighting=weighting)
        if problem is not None:
            problems.append(f"model {index}: {problem}")
    if metric == "step" and not problems and values and all(value == 0 for value in values):
        problems.append("every model has `step` 0, so no checkpoint gets weight")
    return problems


def _metric_values(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[Any]:
    return [values[params["metric"]] for values in model_params]


def _weights(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[float]:
    return mwa_weights(params["metric"], params["penalty"], _metric_values(params, model_params),
                       weighting=params["weighting"])


def check(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Report an invalid metric and weighting pair, metric values that the formula cannot use, and a
    value set for the other metric."""
    problem = weighting_problem(params["metric"], params["weighting"])
    if problem is not None:
        return [problem]
    problems = metric_value_problems(params["metric"], _metric_values(params, model_params),
                                     weighting=params["weighting"])
    other = "step" if params["metric"] == "loss" else "loss"
    if any(values[other] is not None for values in model_params):
        problems.append(f"`{other}` is set but `metric: {params['metric']}` weights by {params['metric']}; "
                        f"remove `{other}` or set `metric: {other}`")
    return problems


def check_model(targets: Sequence[MergeTarget]) -> list[str]:
    """Require one set of weights for the whole model: MWA weights a checkpoint, not a tensor."""
    if not targets:
        return []
    first = targets[0]
    for target in targets[1:]:
        if target.params != first.params or target.model_params != first.model_params:
            return [f"the parameters of tensor {target.name} differ from those of {first.name}; MWA weights "
                    "whole checkpoints, so give each parameter one value, without filters or gradients"]
    return []


# -- operator ---------------------------------------------------------------------------------------

def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return Σ wᵢ θᵢ with the MWA weights of the models' metric values; with `fold`, return a base weight
    with the averaged adapter folded in.

    Without `fold`, `base` and `seeds` are unused. With `fold`, which only the planner's fold plan
    sets, `base` is the base weight W. `tensors` are the N lora_A factors followed by the N lora_B
    factors of its module, or none for a base tensor that no adapter changes. `params` carries the
    planner's `lora_scaling` s and `lora_transposed`. The result is W + s·B̄Ā, or W + s·(B̄Ā)ᵀ when
    transposed. When the adapters store the module's base layer, as peft does for a targeted
    embedding, `base` is None and the N stored copies follow the factors: peft loads their average
    over the base's weight, so W is that average. The factors are averaged whole, so a fold needs
    memory for about three tensors of W's size.
    """
    if params.get("fold"):
        return _fold(base, tensors, params=params, model_params=model_params, seeds=seeds,
                     compute_dtype=compute_dtype)
    return _average(tensors, params=params, model_params=model_params, seeds=seeds, compute_dtype=compute_dtype)


def _average(tensors: Sequence[torch.Tensor], *, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
             seeds: Sequence[int], compute_dtype: torch.dtype) -> torch.Tensor:
    linear.validate_inputs(None, tensors, model_params)
    weights = _weights(params, model_params)
    return linear.operator(None, tensors, params={"normalize": False},
                           model_params=[{"weight": weight} for weight in weights], seeds=seeds,
                           compute_dtype=compute_dtype)


def _fold(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, params: Mapping[str, Any],
          model_params: Sequence[Mapping[str, Any]], seeds: Sequence[int], compute_dtype: torch.dtype) -> torch.Tensor:
    count = len(model_params)
    if base is None and len(tensors) != 3 * count:
        raise ValueError(f"folding without a base weight needs lora_A, lora_B and a stored base layer per model: "
                         f"got {len(tensors)} tensors for {count} models")
    if base is not None and len(tensors) not in (0, 2 * count):
        raise ValueError(f"folding needs one lora_A and one lora_B factor per model: got {len(tensors)} tensors "
                         f"for {count} models")

    def average(group: Sequence[torch.Tensor]) -> torch.Tensor:
        return _average(group, params=params, model_params=model_params, seeds=seeds, compute_dtype=compute_dtype)

    result = average(tensors[2 * count:]) if base is None else base.to(dtype=compute_dtype, copy=True)
    if not tensors:
        return result
    lora_a = average(tensors[:count])
    lora_b = average(tensors[count:2 * count])
    if params["lora_transposed"]:
        # (B̄Ā)ᵀ = Āᵀ B̄ᵀ, accumulated into W without materialising the update first.
        result.addmm_(lora_a.T, lora_b.T, alpha=params["lora_scaling"])
    else:
        result.addmm_(lora_b, lora_a, alpha=params["lora_scaling"])
    return result


# -- metrics from trainer_state.json --------------------------------------------------------------

def read_trainer_metric(folder: Path, metric: str) -> tuple[float | None, str]:
    """Read a checkpoint's metric from its `trainer_state.json`.

    Returns the value, or None with the reason it is missing. The step is `global_step`. The loss is
    that of the last `log_history` entry that has a `loss`, which the Hugging Face Trainer logs every
    `logging_steps`, so it may come from a step before `global_step`.
    """
    path = folder / TRAINER_STATE_FILE
    if not path.is_file():
        return None, f"no {TRAINER_STATE_FILE} in {folder}"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} cannot be read as JSON ({exc})"
    if not isinstance(state, dict):
        return None, f"{path} is not a JSON object"
    if metric == "step":
        step = state.get("global_step")
        if step is None:
            return None, f"{path} has no `global_step`"
        return step, f"global_step of {path}"
    history = state.get("log_history")
    entries = [entry for entry in history if isinstance(entry, dict) and "loss" in entry] if isinstance(history, list) else []
    if not entries:
        return None, f"{path} logs no training `loss` in `log_history`"
    entry = entries[-1]
    return entry["loss"], f"loss logged at step {entry.get('step', '?')} in {path}"


# -- folding an averaged LoRA adapter into its base ------------------------------------------------

ADAPTER_TENSOR_PREFIX = "base_model.model."
"""The prefix of every tensor name in a PEFT adapter file, before the base model's module name."""
_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.(?:(?P<linear>lora_[AB])\.weight|(?P<embedding>lora_embedding_[AB])"
                          r"|(?P<stored>base_layer\.weight))$")

# `init_lora_weights` values that leave the base weights as they are. PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA rewrite them when training starts (peft 0.21), so such an adapter does not fit the original base.
_INIT_KEEPING_BASE = ("gaussian", "eva", "orthogonal", "mica")
# Settings under which peft's forward pass is more than W x + s·B A x, with what each adds.
_UNFOLDABLE_FLAGS = {
    "use_dora": "DoRA magnitude vectors",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA input pooling",
}
_UNFOLDABLE_SETTINGS = {
    "modules_to_save": "fully trained modules",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on bare parameters",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "Activated LoRA, which applies the update only after its invocation tokens",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA singular values",
    "monteclora_config": "MonteCLoRA sampling",
    "use_bdlora": "block-diagonal LoRA",
}


@dataclass(frozen=True)
class LoraModule:
    """One module that a LoRA adapter changes: its base weight, its two factor tensors and its update scale."""

    weight: str
    """The base model's tensor that the update is added to, such as `model.layers.0.self_attn.q_proj.weight`."""
    lora_a: str
    lora_b: str
    """The adapter's tensor names of the factors A (r × in) and B (out × r)."""
    stored_weight: str | None
    """The adapter's copy of the module's base weight, which peft saves for a targeted embedding and
    loads over the base's weight, else None."""
    rank: int
    scaling: float
    transposed: bool
    """Whether the base stores the weight as (in, out), so that the update is (B A)ᵀ: embeddings and
    Conv1D layers (`fan_in_fan_out`)."""


def fold_config_problems(config: Mapping[str, Any]) -> list[str]:
    """Name the adapter settings under which W + s·B A is not the adapted weight, so folding is impossible."""
    problems = [f"`{key}: true` ({what})" for key, what in _UNFOLDABLE_FLAGS.items() if config.get(key)]
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(f"`bias: {bias}` (trained biases of the base layers)")
    problems += [f"`{key}` is set ({what})" for key, what in _UNFOLDABLE_SETTINGS.items() if config.get(key)]
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _INIT_KEEPING_BASE:
        problems.append(f"`init_lora_weights: {init}` may change the base weights when training starts, so the "
                        "adapter does not fit the original base; save the adapter with peft's "
                        "`path_initial_model_for_weight_conversion` to make it fit")
    return problems


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """Return the value of the first pattern that matches the end of `module`, as peft 0.21 matches
    `rank_pattern` and `alpha_pattern` keys (a regex after a dot or at the start), else `default`."""
    if not isinstance(patterns, Mapping):
        return default
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """Return the rank r and the update scale s of one module: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
    rank = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"module {module}: rank r {rank!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"module {module}: lora_alpha {alpha!r} is not a number")
    divisor = math.sqrt(rank) if config.get("use_rslora") else rank
    return rank, alpha / divisor


def lora_modules(config: Mapping[str, Any], tensor_names: Sequence[str]) -> tuple[list[LoraModule], list[str]]:
    """Group an adapter's tensors by module; return the modules and the tensors that cannot be folded."""
    factors: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()
    problems = []
    for name in tensor_names:
        match = _LORA_TENSOR.match(name.removeprefix(ADAPTER_TENSOR_PREFIX))
        if not name.startswith(ADAPTER_TENSOR_PREFIX) or match is None:
            problems.append(f"tensor {name} is not a lora_A or lora_B factor of a linear or embedding layer")
            continue
        module = match["module"]
        kind = "W" if match["stored"] else (match["linear"] or match["embedding"])[-1]
        factors.setdefault(module, {})[kind] = name
        if match["embedding"]:
            embeddings.add(module)

    modules = []
    for module, pair in factors.items():
        if not {"A", "B"} <= set(pair):
            missing = "lora_B" if "A" in pair else "lora_A"
            problems.append(f"module {module} has no {missing} tensor")
            continue
        try:
            rank, scaling = lora_scaling(config, module)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        # NOTE: peft turns `fan_in_fan_out` off for each torch.nn.Linear target, which a name cannot show.
        # A square Linear weight in a `fan_in_fan_out` adapter would be folded transposed; the shape
        # check catches the others.
        transposed = module in embeddings or bool(config.get("fan_in_fan_out"))
        modules.append(LoraModule(f"{module}.weight", pair["A"], pair["B"], pair.get("W"), rank, scaling,
                                  transposed))
    return modules, problems


def _fold_shape_problem(module: LoraModule, base_shape: Sequence[int], a_shape: Sequence[int],
                        b_shape: Sequence[int]) -> str | None:
    if len(a_shape) != 2 or len(b_shape) != 2:
        return (f"module {module.weight}: lora_A has shape {list(a_shape)} and lora_B {list(b_shape)}; only "
                "linear and embedding adapters (2-D factors) can be folded")
    if a_shape[0] != module.rank or b_shape[1] != module.rank:
        return (f"module {module.weight}: the factors have rank {a_shape[0]} and {b_shape[1]}, but "
                f"adapter_config.json gives r = {module.rank}, so the update scale would be wrong")
    update = (b_shape[0], a_shape[1])
    expected = tuple(reversed(update)) if module.transposed else update
    if tuple(base_shape) != expected:
        return (f"module {module.weight}: the update B A has shape {list(update)}"
                f"{' (stored transposed)' if module.transposed else ''} but the base weight has "
                f"shape {list(base_shape)}; fold the adapter into the base it was trained on")
    return None


def plan_fold(recipe: Any, plan: Any, base: Any) -> Any:
    """Turn the plan of an averaged LoRA adapter into the plan of its base with the adapter folded in.

    `plan` merges the adapter tensors among themselves and `base` is the opened base model (None when
    the models are not adapters). Every base tensor becomes one job: an adapted module's weight
    reads W and each model's lora_A and lora_B, and every other float tensor passes through the
    operator so that `out_dtype` applies to it. Raise RecipeError or InputError before any write
    when the inputs cannot be folded.
    """
    # Imported here: the planner imports the method registry, which imports this module.
    from mergekit_plus import architecture
    from mergekit_plus.io.sidefiles import read_adapter_config
    from mergekit_plus.io.writer import PlannedTensor, plan_layout
    from mergekit_plus.plan import DTYPES, FLOAT_DTYPES, TensorJob, TensorRead, estimate_peak_bytes

    # 1. Only LoRA adapters whose forward pass is W x + s·B A x fold.
    if plan.adapter is None or base is None:
        raise RecipeError(["parameters.fold: `fold: true` folds an averaged LoRA adapter into its base model, "
                           "but the models are full checkpoints; remove `fold`"])
    label = plan.models[0].source.label
    hint = "merge without `fold` to write the averaged adapter, then load it with peft"
    config = read_adapter_config(plan.adapter.folder)
    problems = fold_config_problems(config)
    if problems:
        raise InputError(f"the adapter {label} cannot be folded into its base: {'; '.join(problems)}", hint=hint)
    jobs_by_name = {job.name: job for job in plan.jobs}
    modules, problems = lora_modules(config, list(jobs_by_name))

    # 2. The base's tensors, less heads that its config ties to the embedding, as in any merge.
    base_tensors = base.reader.tensors
    tied = architecture.tied_head_names(base.reader.config, base_tensors)
    names = sorted(set(base_tensors) - tied, key=architecture.sort_key)
    dropped = [(name, "tied to the input embedding by tie_word_embeddings in the output config")
               for name in sorted(tied & set(base_tensors))]
    for module in modules:
        info = base_tensors.get(module.weight)
        if module.weight in tied:
            problems.append(f"module {module.weight}: the base ties it to the input embedding, so it is not "
                            "stored and cannot take the update")
        elif info is None:
            problems.append(f"module {module.weight}: the base {base.source.label} has no such tensor")
        else:
            a_job, b_job = jobs_by_name[module.lora_a], jobs_by_name[module.lora_b]
            problem = _fold_shape_problem(module, info.shape, a_job.output.shape, b_job.output.shape)
            stored = jobs_by_name[module.stored_weight].output.shape if module.stored_weight else info.shape
            if problem is None and tuple(stored) != tuple(info.shape):
                problem = (f"module {module.weight}: the adapter stores its base layer with shape {list(stored)} "
                           f"but the base has shape {list(info.shape)}, as after resizing the vocabulary")
            if problem is not None:
                problems.append(problem)
    if problems:
        listed = problems[:10] + ([f"and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise InputError(f"the adapter {label} cannot be folded into {base.source.label}: {'; '.join(listed)}",
                         hint=hint)

    # 3. One job per base tensor.
    if recipe.out_dtype:
        out_dtype = DTYPES[recipe.out_dtype]
    else:
        stored: Counter[torch.dtype] = Counter()
        for info in base_tensors.values():
            if info.dtype in FLOAT_DTYPES:
                stored[info.dtype] += info.nbytes
        out_dtype = stored.most_common(1)[0][0] if stored else torch.float32
    by_weight = {module.weight: module for module in modules}
    reference_job = plan.jobs[0]
    jobs = []
    for name in names:
        info = base_tensors[name]
        read = TensorRead(base, info)
        if info.dtype not in FLOAT_DTYPES:
            jobs.append(TensorJob(name, "copy", PlannedTensor(name, info.dtype, info.shape), models=(read,)))
            continue
        module = by_weight.get(name)
        factors: tuple[Any, ...] = ()
        params = {**reference_job.params}
        if module is not None:
            factors = jobs_by_name[module.lora_a].models + jobs_by_name[module.lora_b].models
            if module.stored_weight is not None:
                factors += jobs_by_name[module.stored_weight].models
                read = None
            params.update(lora_scaling=module.scaling, lora_transposed=module.transposed)
        jobs.append(TensorJob(name, "merge", PlannedTensor(name, out_dtype, info.shape), base=read, models=factors,
                              params=params, model_params=reference_job.model_params))

    # 4. A full checkpoint: sharded as usual, with the base's config and tokenizer.
    layout = plan_layout([job.output for job in jobs], max_shard_bytes=recipe.shard_size_bytes,
                         metadata={"format": "pt"})
    if plan.staged is not None:
        plan.staged.check_free_space(layout.total_size)
    tokenizer_source = base.source if recipe.tokenizer_source_name == "base" else plan.tokenizer_source
    logger.info("folding the averaged adapter into %d modules of %s (scale %s)", len(modules), base.source.label,
                ", ".join(sorted({f"{module.scaling:g}" for module in modules})))
    return replace(plan, base=base, reference=base, tokenizer_source=tokenizer_source, jobs=tuple(jobs),
                   dropped=tuple(dropped), layout=layout, out_dtype=out_dtype, config=base.reader.config,
                   peak_bytes_estimate=estimate_peak_bytes(jobs, plan.compute_dtype), adapter=None)


# -- the method -------------------------------------------------------------------------------------

_SINGLE_VALUED = ("metric", "penalty", "weighting", "fold")


@dataclass(frozen=True)
class MetricsWeightedMethod(MergeMethod):
    """A merge method whose per-model metric values may come from each checkpoint's trainer state,
    and whose averaged LoRA adapter may be folded into its base."""

    def fill_model_parameters(self, recipe: Any, models: Sequence[tuple[int, str, Path]]) -> Any:
        """Return `recipe` with each model's metric value set, from the recipe or from trainer_state.json.

        `models` lists (recipe index, label, folder) of each input model. Raise RecipeError naming
        every model whose metric is missing or invalid, before any tensor is read.
        """
        for name in _SINGLE_VALUED:
            if isinstance(recipe.parameters.get(name), list):
                raise RecipeError([f"parameters.{name}: MWA weights whole checkpoints, so `{name}` takes one "
                                   "value, not a gradient or filter list"])
        metric = recipe.parameters.get("metric", "loss")
        penalty = recipe.parameters.get("penalty", 1.0)
        weighting = recipe.parameters.get("weighting", "power")
        problem = weighting_problem(metric, weighting)
        if problem is not None:
            raise RecipeError([f"parameters: {problem}"])

        problems: list[str] = []
        specs = list(recipe.models)
        values: list[float] = []
        for index, label, folder in models:
            own = specs[index].parameters
            where = f"models[{index}] ({label})"
            if metric in own or metric in recipe.parameters:
                value = own.get(metric, recipe.parameters.get(metric))
                origin = "the recipe"
            else:
                value, origin = read_trainer_metric(folder, metric)
                if value is None:
                    problems.append(f"{where}: no `{metric}` in the recipe and {origin}; set `{metric}:` under "
                                    "this model's `parameters:`")
                    continue
            if isinstance(value, list):
                problems.append(f"{where}: `{metric}` takes one value, not a gradient or filter list")
                continue
            problem = metric_value_problem(metric, value, weighting=weighting)
            if problem is not None:
                problems.append(f"{where}: {problem} (from {origin}); fix it, or set `{metric}:` under this "
                                "model's `parameters:`")
                continue
            if metric not in own:
                specs[index] = specs[index].model_copy(update={"parameters": {**own, metric: value}})
            values.append(value)
        if not problems:
            problems = metric_value_problems(metric, values, weighting=weighting)
        if problems:
            raise RecipeError(problems)

        weights = mwa_weights(metric, float(penalty), values, weighting=weighting)
        for (_, label, _), value, weight in zip(models, values, weights):
            logger.info("mwa weight of %s: %.6f (%s %g, %s weighting, penalty %g)", label, weight, metric, value,
                        weighting, penalty)
        return recipe.model_copy(update={"models": specs})

    def model_weights(self, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[float]:
        """Return each model's weight in the merge, for the model card."""
        return _weights(params, model_params)

    def folds_adapter(self, recipe: Any) -> bool:
        """Return whether the recipe sets `fold: true`, which folds the averaged adapter into its base."""
        return recipe.parameters.get("fold") is True

    def plan_fold(self, recipe: Any, plan: Any, base: Any) -> Any:
        """Return the plan that folds the averaged adapter of `plan` into `base`, as `plan_fold` builds it."""
        return plan_fold(recipe, plan, base)


METHOD = MetricsWeightedMethod(
    name="mwa",
    title="Metrics-Weighted Averaging (MWA)",
    paper="Yu and Choi, Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging, arXiv:2504.18580",
    summary="Weighted average of checkpoints of one run, weighted by training loss or step; "
            "full checkpoints or LoRA adapters, optionally folded into their base.",
    requires_base=False,
    operator=operator,
    params=(
        Param("metric", str, "loss", "The metric that weights each checkpoint: training `loss` (lower weighs "
              "more) or training `step` (later weighs more).", choices=METRICS),
        Param("penalty", float, 1.0, "Penalty factor p; 0 gives the uniform average.", minimum=0.0),
        Param("weighting", str, "power", "How p turns metric values into weights: `power` (wᵢ ∝ Lᵢ^(−p) or sᵢ^p) "
              "or `exponential` (wᵢ ∝ exp(−p·Lᵢ), loss only).", choices=tuple(WEIGHTINGS)),
        Param("fold", bool, False, "For LoRA adapter inputs: write the base model with the averaged adapter "
              "folded in (a full checkpoint) instead of an adapter folder."),
        Param("loss", float, None, "Training loss of this checkpoint; unset: read from its trainer_state.json.",
              per_model=True),
        Param("step", float, None, "Training step of this checkpoint; unset: global_step of its "
              "trainer_state.json.", per_model=True, minimum=0.0),
    ),
    check=check,
    check_model=check_model,
)
