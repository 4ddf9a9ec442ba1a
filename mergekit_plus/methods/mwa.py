"""Metrics-Weighted Averaging (MWA) of checkpoints of one training run.

Paper: Yu and Choi, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging",
arXiv:2504.18580 (2025).

Formula, per tensor, for checkpoints θ₁ … θ_N of one run with metric values m₁ … m_N and penalty p:

    θ = Σ wᵢ θᵢ        with Σ wᵢ = 1
    metric loss:  wᵢ = Lᵢ^(−p) / Σⱼ Lⱼ^(−p)     (lower training loss, more weight)
    metric step:  wᵢ = sᵢ^p / Σⱼ sⱼ^p           (later step, more weight)

p = 0 gives the uniform average. As p grows the weight moves to the lowest-loss (or last) checkpoint.

NOTE: the abstract states only that one penalty factor shapes the weights whatever the number of
checkpoints. The power form above is an assumption that matches that description: the method
section of the paper could not be read, so neither the form nor the default p = 1 is confirmed.

Parameters:
    metric (default loss): `loss` or `step`.
    penalty (default 1.0): p ≥ 0.
    loss, step (per model, default unset): the checkpoint's metric value. When the recipe leaves the
        chosen metric unset, the planner reads it from the checkpoint's `trainer_state.json`:
        `global_step` for `step`, and the `loss` of the last `log_history` entry that has one for `loss`.

The inputs are full checkpoints or PEFT LoRA adapter folders. Adapter tensors are averaged as
stored, lora_A and lora_B separately, which is what averaging adapter checkpoints does. That is
not the average of the updates ΔWᵢ = Bᵢ Aᵢ, because Σ wᵢ Bᵢ · Σ wᵢ Aᵢ ≠ Σ wᵢ Bᵢ Aᵢ in general.

Not covered: metrics other than training loss and step (such as a validation score), folding an
averaged adapter into its base model, and weights that vary by tensor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_plus.errors import RecipeError
from mergekit_plus.methods import linear
from mergekit_plus.methods.base import MergeMethod, MergeTarget, Param

logger = logging.getLogger(__name__)

METRICS = ("loss", "step")
TRAINER_STATE_FILE = "trainer_state.json"


def mwa_weights(metric: str, penalty: float, values: Sequence[float]) -> list[float]:
    """Return the normalised MWA weights of checkpoints with these metric values.

    The weights are a softmax of ∓p·log(mᵢ) in float64, so a large p or a wide range of values
    neither overflows nor underflows to a zero sum. A step of 0 gets weight 0 when p > 0.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    problems = metric_value_problems(metric, values)
    if problems:
        raise ValueError("; ".join(problems))
    if penalty == 0:
        return [1.0 / len(values)] * len(values)
    sign = -1.0 if metric == "loss" else 1.0
    logits = [sign * penalty * math.log(value) if value > 0 else -math.inf for value in values]
    peak = max(logits)
    scaled = [math.exp(logit - peak) for logit in logits]
    total = math.fsum(scaled)
    return [value / total for value in scaled]


def metric_value_problem(metric: str, value: Any) -> str | None:
    """Describe why the weight formula cannot use one metric value, or return None when it can."""
    if value is None:
        return f"no `{metric}` value"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"`{metric}` {value!r} is not a finite number"
    if metric == "loss" and value <= 0:
        return f"`loss` {value} is not above 0, which the loss weight Lᵢ^(−p) needs"
    if metric == "step" and value < 0:
        return f"`step` {value} is negative"
    return None


def metric_value_problems(metric: str, values: Sequence[Any]) -> list[str]:
    """Describe the metric values that the weight formula cannot use, one sentence per model."""
    problems = []
    for index, value in enumerate(values):
        problem = metric_value_problem(metric, value)
        if problem is not None:
            problems.append(f"model {index}: {problem}")
    if metric == "step" and not problems and values and all(value == 0 for value in values):
        problems.append("every model has `step` 0, so no checkpoint gets weight")
    return problems


def _metric_values(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[Any]:
    return [values[params["metric"]] for values in model_params]


def check(params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    """Report metric values that the weight formula cannot use, and a value set for the other metric."""
    problems = metric_value_problems(params["metric"], _metric_values(params, model_params))
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
                    "whole checkpoints, so give `metric`, `penalty`, `loss` and `step` one value each, "
                    "without filters or gradients"]
    return []


def operator(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return Σ wᵢ θᵢ with the MWA weights of the models' metric values. `base` and `seeds` are unused."""
    linear.validate_inputs(None, tensors, model_params)
    weights = mwa_weights(params["metric"], params["penalty"], _metric_values(params, model_params))
    return linear.operator(None, tensors, params={"normalize": False},
                           model_params=[{"weight": weight} for weight in weights], seeds=seeds,
                           compute_dtype=compute_dtype)


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


@dataclass(frozen=True)
class MetricsWeightedMethod(MergeMethod):
    """A merge method whose per-model metric values may come from each checkpoint's trainer state."""

    def fill_model_parameters(self, recipe: Any, models: Sequence[tuple[int, str, Path]]) -> Any:
        """Return `recipe` with each model's metric value set, from the recipe or from trainer_state.json.

        `models` lists (recipe index, label, folder) of each input model. Raise RecipeError naming
        every model whose metric is missing or invalid, before any tensor is read.
        """
        metric = recipe.parameters.get("metric", "loss")
        penalty = recipe.parameters.get("penalty", 1.0)
        for name, value in (("metric", metric), ("penalty", penalty)):
            if isinstance(value, list):
                raise RecipeError([f"parameters.{name}: MWA weights whole checkpoints, so `{name}` takes one "
                                   "value, not a gradient or filter list"])
        if metric not in METRICS:
            raise RecipeError([f"parameters.metric: `metric` must be one of {', '.join(METRICS)}, got {metric!r}"])

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
            problem = metric_value_problem(metric, value)
            if problem is not None:
                problems.append(f"{where}: {problem} (from {origin}); fix it, or set `{metric}:` under this "
                                "model's `parameters:`")
                continue
            if metric not in own:
                specs[index] = specs[index].model_copy(update={"parameters": {**own, metric: value}})
            values.append(value)
        if not problems:
            problems = metric_value_problems(metric, values)
        if problems:
            raise RecipeError(problems)

        weights = mwa_weights(metric, float(penalty), values)
        for (_, label, _), value, weight in zip(models, values, weights):
            logger.info("mwa weight of %s: %.6f (%s %g, penalty %g)", label, weight, metric, value, penalty)
        return recipe.model_copy(update={"models": specs})

    def model_weights(self, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]) -> list[float]:
        """Return each model's weight in the merge, for the model card."""
        return mwa_weights(params["metric"], params["penalty"], _metric_values(params, model_params))


METHOD = MetricsWeightedMethod(
    name="mwa",
    title="Metrics-Weighted Averaging (MWA)",
    paper="Yu and Choi, Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging, arXiv:2504.18580",
    summary="Weighted average of checkpoints of one run, weighted by training loss or step; "
            "full checkpoints or LoRA adapters.",
    requires_base=False,
    operator=operator,
    params=(
        Param("metric", str, "loss", "The metric that weights each checkpoint: training `loss` (lower weighs "
              "more) or training `step` (later weighs more).", choices=METRICS),
        Param("penalty", float, 1.0, "Penalty factor p: wᵢ ∝ Lᵢ^(−p) or sᵢ^p; 0 gives the uniform average.",
              minimum=0.0),
        Param("loss", float, None, "Training loss of this checkpoint; unset: read from its trainer_state.json.",
              per_model=True),
        Param("step", float, None, "Training step of this checkpoint; unset: global_step of its "
              "trainer_state.json.", per_model=True, minimum=0.0),
    ),
    check=check,
    check_model=check_model,
)
