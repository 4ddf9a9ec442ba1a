"""The Frank-Wolfe learning phase: iterations over the candidate checkpoints on labelled data, before the merge.

Memory: the current merge θ⁽ᵗ⁾ lives in the parameters of a `transformers` model built from the base
folder, in float32 on the merge device, and its gradient in their `.grad`. The candidates stay on
disk: scoring and every step read them one tensor at a time, so besides the model and its gradient
at most one tensor of each candidate, of the base and of θ⁽⁰⁾ is in memory. θ⁽⁰⁾ is recomputed
per tensor when needed rather than kept.

The loss of a task is the mean over its examples of the mean cross-entropy of the answer tokens,
end-of-sequence included, given the prompt (teacher forcing). The hard variant's loss is the mean
over the tasks with data; the soft variant takes one task's loss at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekit_plus.errors import InputError, RecipeError
from mergekit_plus.learn.data import read_labelled_rows, task_of_model
from mergekit_plus.methods import task_arithmetic, ties
from mergekit_plus.methods.frank_wolfe import (
    ZERO,
    initial_point,
    move_toward,
    score,
    select_vertices,
    step_size,
)
from mergekit_plus.methods.ties import ModelThreshold, TrimThresholds

logger = logging.getLogger(__name__)

RECORD_FILE = "frank_wolfe.json"
DEFAULT_SAMPLES = 100
"""Labelled rows per task when the `data:` entry sets no `samples`: FusionBench's `dataset_size`."""
INITIAL_LABEL = "initial"
ZERO_LABEL = "zero"
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Settings:
    """The parameters of the iterations, one value for the whole merge."""

    variant: str
    iterations: int
    step_size: float
    merge_fn: str
    scaling: float
    density: float
    granularity: str
    init: str
    score: str
    selection: str

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Settings:
        return cls(variant=params["variant"], iterations=params["iterations"], step_size=params["step_size"],
                   merge_fn=params["merge_fn"], scaling=params["scaling"], density=params["density"],
                   granularity=params["granularity"], init=initial_point(params), score=params["score"],
                   selection=params["selection"])

    @property
    def linear(self) -> bool:
        """Whether every step is linear, so that θ⁽ᵗ⁾ is a combination of the base and the candidates."""
        return self.merge_fn == "task_arithmetic"


class TensorInputs(Protocol):
    """The base and candidate tensors of the merged tensors, each returned as a new float32 tensor."""

    names: Sequence[str]
    count: int
    """The number of candidates."""

    def numel(self, name: str) -> int: ...

    def base(self, name: str) -> torch.Tensor: ...

    def candidate(self, index: int, name: str) -> torch.Tensor: ...


class PlanInputs:
    """The inputs of a plan's merged tensors, read from disk one tensor at a time."""

    def __init__(self, jobs: Sequence[Any], device: torch.device) -> None:
        self._jobs = {job.name: job for job in jobs}
        self.names = [job.name for job in jobs]
        self.count = len(jobs[0].models) if jobs else 0
        self.device = device

    def numel(self, name: str) -> int:
        return math.prod(self._jobs[name].output.shape)

    def base(self, name: str) -> torch.Tensor:
        read = self._jobs[name].base
        return read.input.reader.read(read.info.name).to(device=self.device, dtype=torch.float32)

    def candidate(self, index: int, name: str) -> torch.Tensor:
        read = self._jobs[name].models[index]
        return read.input.reader.read(read.info.name).to(device=self.device, dtype=torch.float32)


@dataclasses.dataclass
class IterationRecord:
    """The losses, picks and step of one iteration."""

    iteration: int
    step: float
    """γ of this iteration; the step moves by γ · scaling."""
    losses: dict[str, float]
    """Each task's loss at θ⁽ᵗ⁾, before the step."""
    picks: list[list[int]]
    """One list per pick (one in the hard variant, one per task in the soft one): the vertex of each tensor."""
    pick_tasks: list[str | None]
    """The task whose gradient made each pick; None for the hard variant's loss over every task."""
    totals: list[list[float]] | None = None
    """With granularity task: for each pick, the summed score of every vertex."""


GradientFunction = Callable[[str | None], tuple[Mapping[str, torch.Tensor], dict[str, float]]]
"""Return the gradient at the current weights of one task's loss, or of the mean over tasks for None,
with each task's loss."""


class FrankWolfe:
    """The iterations on weights that the caller owns and passes as `current`, with candidates read from `inputs`.

    Vertices are numbered: 0 … P − 1 the candidates, P θ⁽⁰⁾ ("initial", hard variant only), and
    ZERO the zero tensor. With a linear merge_fn, `rows[name]` tracks θ⁽ᵗ⁾ of a tensor as
    coefficients over (θ₀, θ₁ … θ_P).
    """

    def __init__(self, inputs: TensorInputs, settings: Settings) -> None:
        self.inputs = inputs
        self.settings = settings
        self.initial_vertex = inputs.count if settings.variant == "hard" else None
        self.vertex_count = inputs.count + (1 if self.initial_vertex is not None else 0)
        self.rows: dict[str, torch.Tensor] = {}
        self.records: list[IterationRecord] = []
        self._initial_thresholds: tuple[ModelThreshold, ...] | None = None
        self._position = {name: index for index, name in enumerate(inputs.names)}

    # -- θ⁽⁰⁾ ---------------------------------------------------------------------------------

    def initial_row(self) -> torch.Tensor:
        """Return θ⁽⁰⁾ as coefficients over (θ₀, θ₁ … θ_P), for a linear merge_fn."""
        row = torch.zeros(self.inputs.count + 1, dtype=torch.float64)
        if self.settings.init == "base":
            row[0] = 1.0
        else:
            row[0] = 1.0 - self.settings.scaling * self.inputs.count
            row[1:] = self.settings.scaling
        return row

    def start(self, current: Mapping[str, torch.Tensor]) -> None:
        """Write θ⁽⁰⁾ into `current`, and its coefficients into `rows` for a linear merge_fn."""
        if self.settings.init == "merge" and not self.settings.linear:
            densities = [self.settings.density] * self.inputs.count
            self._initial_thresholds = self._trim_thresholds(
                lambda name: (self.inputs.base(name), self._candidates(name)), densities)
        with torch.no_grad():
            for name in self.inputs.names:
                current[name].copy_(self.initial_tensor(name).view_as(current[name]))
        if self.settings.linear:
            self.rows = {name: self.initial_row() for name in self.inputs.names}

    def initial_tensor(self, name: str, candidates: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Return θ⁽⁰⁾ of one tensor, from the base and the candidates (read unless given)."""
        base = self.inputs.base(name)
        if self.settings.init == "base":
            return base
        candidates = self._candidates(name) if candidates is None else candidates
        count = len(candidates)
        if self.settings.linear:
            params = {"lambda": self.settings.scaling, "normalize": False}
            return task_arithmetic.operator(base, candidates, params=params, model_params=[{"weight": 1.0}] * count,
                                            seeds=(), compute_dtype=torch.float32)
        return ties.operator(base, candidates, params=_ties_params(self.settings.scaling),
                             model_params=[{"weight": 1.0, "density": self.settings.density}] * count, seeds=(),
                             compute_dtype=torch.float32, statistics=self._initial_thresholds)

    def _candidates(self, name: str) -> list[torch.Tensor]:
        return [self.inputs.candidate(index, name) for index in range(self.inputs.count)]

    # -- one iteration --------------------------------------------------------------------------

    def iterate(self, iteration: int, current: Mapping[str, torch.Tensor], gradient: GradientFunction,
                tasks: Sequence[str]) -> IterationRecord:
        """Run iteration t (from 0): gradient, picks, step. Return its record, also kept in `records`."""
        settings = self.settings
        gamma = step_size(iteration, eta=settings.step_size, variant=settings.variant)
        record = IterationRecord(iteration, gamma, {}, [], [], [] if settings.granularity == "task" else None)

        # 1. The hard variant picks once, for the loss over every task. The soft variant picks once
        #    per task, and no pick may take a vertex of an earlier one, so it stops when none is left.
        pick_tasks: list[str | None] = [None] if settings.variant == "hard" else list(tasks)
        for task in pick_tasks:
            gradients, losses = gradient(task)
            record.losses.update(losses)
            scores = self.score(gradients)
            excluded = [[pick[k] for pick in record.picks if pick[k] != ZERO] for k in range(len(scores))]
            record.picks.append(select_vertices(scores, granularity=settings.granularity,
                                                selection=settings.selection, excluded=excluded))
            record.pick_tasks.append(task)
            if record.totals is not None:
                record.totals.append([math.fsum(row[vertex] for row in scores) for vertex in range(self.vertex_count)])
            if len(record.picks) >= self.vertex_count:
                break

        # 2. The step toward the picks.
        with torch.no_grad():
            if settings.linear:
                self._linear_step(current, record.picks, gamma * settings.scaling)
            else:
                self._ties_step(current, record.picks[0], gamma * settings.scaling)
        self.records.append(record)
        return record

    def score(self, gradients: Mapping[str, torch.Tensor]) -> list[list[float]]:
        """Return scores[k][v]: the score of tensor k's gradient with vertex v's full tensor k."""
        kind = self.settings.score
        scores = []
        for name in self.inputs.names:
            gradient = gradients[name]
            candidates = self._candidates(name)
            row = [score(gradient, candidate, kind=kind) for candidate in candidates]
            if self.initial_vertex is not None:
                row.append(score(gradient, self.initial_tensor(name, candidates), kind=kind))
            scores.append(row)
            del candidates
        return scores

    def vertex_tensor(self, vertex: int, name: str) -> torch.Tensor | None:
        """Return vertex v's tensor of `name`, or None for the zero tensor."""
        if vertex == ZERO:
            return None
        if vertex == self.initial_vertex:
            return self.initial_tensor(name)
        return self.inputs.candidate(vertex, name)

    def vertex_row(self, vertex: int) -> torch.Tensor | None:
        """Return vertex v as coefficients over (θ₀, θ₁ … θ_P), or None for the zero tensor."""
        if vertex == ZERO:
            return None
        if vertex == self.initial_vertex:
            return self.initial_row()
        row = torch.zeros(self.inputs.count + 1, dtype=torch.float64)
        row[vertex + 1] = 1.0
        return row

    def _linear_step(self, current: Mapping[str, torch.Tensor], picks: list[list[int]], scale: float) -> None:
        for k, name in enumerate(self.inputs.names):
            vertices = [self.vertex_tensor(pick[k], name) for pick in picks]
            move_toward(current[name], [None if v is None else v.view_as(current[name]) for v in vertices], scale)
            move_toward(self.rows[name], [self.vertex_row(pick[k]) for pick in picks], scale)

    def _ties_step(self, current: Mapping[str, torch.Tensor], pick: list[int], scale: float) -> None:
        # The trim threshold of s − θ⁽ᵗ⁾ is over the whole model, so it needs passes before the step.
        def difference(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            weights = current[name].detach()
            vertex = self.vertex_tensor(pick[self._position[name]], name)
            return weights, [torch.zeros_like(weights) if vertex is None else vertex.view_as(weights)]

        threshold = self._trim_thresholds(difference, [self.settings.density])
        for name in self.inputs.names:
            weights, vertex = difference(name)
            stepped = ties.operator(weights, vertex, params=_ties_params(scale),
                                    model_params=[{"weight": 1.0, "density": self.settings.density}], seeds=(),
                                    compute_dtype=torch.float32, statistics=threshold)
            current[name].copy_(stepped.view_as(weights))

    def _trim_thresholds(self, pairs: Callable[[str], tuple[torch.Tensor, list[torch.Tensor]]],
                         densities: Sequence[float]) -> tuple[ModelThreshold, ...]:
        """Find the whole-model TIES trim thresholds of the differences that `pairs` gives per tensor."""
        numel = sum(self.inputs.numel(name) for name in self.inputs.names)
        reducer = TrimThresholds(densities, [numel] * len(densities), torch.float32)
        while not reducer.done:
            for name in self.inputs.names:
                base, tensors = pairs(name)
                reducer.update(name, base, tensors, models=range(len(tensors)), params={},
                               model_params=[{}] * len(tensors))
            reducer.finish_pass()
        return reducer.result()


def _ties_params(scale: float) -> dict[str, Any]:
    # FusionBench's TIES: global trim, elected sign, disjoint sum, scaled by `scale`.
    return {"lambda": scale, "normalize": False, "sign_election": "trimmed", "scope": "model"}


# -- the labelled loss --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskExamples:
    """One task's tokenized examples (prompt ids, answer ids ending in end-of-sequence) and batch size."""

    examples: list[tuple[list[int], list[int]]]
    batch_size: int


def encode_example(tokenizer: Any, prompt: str, answer: str, *, max_length: int) -> tuple[list[int], list[int]]:
    """Tokenize one example into prompt ids (the last `max_length`) and answer ids ending in end-of-sequence.

    The answer's ids are those of prompt + answer after the prompt's own ids, because a tokenizer
    may merge characters across the boundary. When the prompt's ids are not a prefix of the joint
    ids, the answer is tokenized alone.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    joint = list(tokenizer(prompt + answer)["input_ids"])
    if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
        answer_ids = joint[len(prompt_ids):]
    else:
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids.append(eos)
    return prompt_ids[-max_length:], answer_ids


def answer_loss_sum(network: torch.nn.Module, batch: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                    device: torch.device) -> torch.Tensor:
    """Return the sum over the batch of each example's mean cross-entropy on its answer tokens."""
    width = max(len(prompt) + len(answer) for prompt, answer in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(batch):
        tokens = prompt + answer
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, len(prompt) : len(tokens)] = torch.tensor(answer)
        mask[row, : len(tokens)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)

    # Position j predicts token j + 1.
    logits = network(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / counts).sum()


class LabelledLoss:
    """The answer cross-entropy of the tasks with data, evaluated at the weights of `network`."""

    def __init__(self, network: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                 examples: Mapping[str, TaskExamples], *, pad_id: int, device: torch.device) -> None:
        self.network = network
        self.tensors = tensors
        self.examples = examples
        self.pad_id = pad_id
        self.device = device

    def gradient(self, task: str | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Return the gradient of one task's loss, or of the mean over every task for None, and the losses."""
        tasks = list(self.examples) if task is None else [task]
        self.network.zero_grad(set_to_none=True)
        losses = {}
        with torch.enable_grad():
            for name in tasks:
                data = self.examples[name]
                total = 0.0
                for start in range(0, len(data.examples), data.batch_size):
                    batch = data.examples[start : start + data.batch_size]
                    loss = answer_loss_sum(self.network, batch, pad_id=self.pad_id, device=self.device)
                    (loss / (len(data.examples) * len(tasks))).backward()
                    total += loss.item()
                losses[name] = total / len(data.examples)
        # A merged tensor that is no parameter, or that the loss does not reach, has a zero gradient.
        gradients = {name: tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                     for name, tensor in self.tensors.items()}
        return gradients, losses

    def losses(self) -> dict[str, float]:
        """Return each task's loss at the current weights, without gradients."""
        result = {}
        with torch.no_grad():
            for name, data in self.examples.items():
                total = 0.0
                for start in range(0, len(data.examples), data.batch_size):
                    batch = data.examples[start : start + data.batch_size]
                    total += answer_loss_sum(self.network, batch, pad_id=self.pad_id, device=self.device).item()
                result[name] = total / len(data.examples)
        return result


# -- the phase in a plan ----------------------------------------------------------------------------

@dataclasses.dataclass
class FrankWolfePhase:
    """The learning phase of a plan: its memory estimate and the function that runs it."""

    memory_bytes: int
    memory_contents: str
    """The data that the memory estimate counts, in words for the plan's log."""
    run_phase: Callable[..., Any]

    def run(self, plan: Any, *, device: torch.device, progress: bool) -> Any:
        """Run the iterations and return the plan with their result in every merged tensor."""
        return self.run_phase(plan, device=device, progress=progress)


@dataclasses.dataclass
class FrankWolfeRecord:
    """The record of the learning phase: settings, picks and coefficients, written as frank_wolfe.json."""

    settings: Settings
    candidates: list[dict[str, Any]]
    vertices: list[str]
    tensors: list[str]
    iterations: list[IterationRecord]
    final_losses: dict[str, float]
    coefficients: list[list[float]] | None
    """Per tensor, θ⁽ᵀ⁾ as coefficients over (base, candidates), for a linear merge_fn; else None."""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        iterations = []
        for record in self.iterations:
            entry: dict[str, Any] = {"iteration": record.iteration, "step": record.step,
                                     "scaled_step": record.step * self.settings.scaling, "losses": record.losses,
                                     "picks": []}
            for index, (task, pick) in enumerate(zip(record.pick_tasks, record.picks)):
                pick_entry: dict[str, Any] = {"task": task}
                if self.settings.granularity == "task":
                    pick_entry["vertex"] = self.label(pick[0])
                    pick_entry["score_sums"] = dict(zip(self.vertices, record.totals[index]))
                else:
                    pick_entry["counts"] = self._counts(pick)
                    pick_entry["vertices"] = [self.label(vertex) for vertex in pick]
                entry["picks"].append(pick_entry)
            iterations.append(entry)
        coefficients = None
        if self.coefficients is not None:
            coefficients = {"columns": ["base", *self.vertices[: len(self.candidates)]], "values": self.coefficients}
        return {"method": "frank_wolfe", "settings": dataclasses.asdict(self.settings), "candidates": self.candidates,
                "tensors": self.tensors, "iterations": iterations, "final_losses": self.final_losses,
                "coefficients": coefficients, "seconds": round(self.seconds, 3)}

    def label(self, vertex: int) -> str:
        return ZERO_LABEL if vertex == ZERO else self.vertices[vertex]

    def _counts(self, pick: list[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for vertex in pick:
            counts[self.label(vertex)] = counts.get(self.label(vertex), 0) + 1
        return counts

    def summary(self, record: IterationRecord) -> str:
        """Describe one iteration's picks in a few words, for the log."""
        parts = []
        for task, pick in zip(record.pick_tasks, record.picks):
            chosen = self.label(pick[0]) if self.settings.granularity == "task" else \
                ", ".join(f"{label} {count}" for label, count in self._counts(pick).items())
            parts.append(chosen if task is None else f"{task}: {chosen}")
        return "; ".join(parts)

    def write_files(self, folder: Path) -> list[str]:
        """Write frank_wolfe.json into `folder`; return the file names."""
        (folder / RECORD_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return [RECORD_FILE]


def plan_frank_wolfe(recipe: Any, plan: Any) -> FrankWolfePhase | None:
    """Return the learning phase of a frank_wolfe plan, or None when the recipe sets every coefficient.

    Raise RecipeError when the iterations need data and no task of the models has a `data:` entry,
    or when the vocabularies are aligned by token.
    """
    merged = [job for job in plan.jobs if job.action == "merge"]
    if not merged:
        return None
    params = merged[0].params
    settings = Settings.from_params(params)
    coefficients_given = all(mp["coefficient"] is not None for job in merged for mp in job.model_params)
    if settings.linear and coefficients_given:
        return None
    if any(job.row_maps is not None for job in merged):
        raise RecipeError(["frank_wolfe cannot learn with `tokenizer.vocab: align`; merge models with the same "
                           "vocabulary"])
    tasks = [task_of_model(spec.model, spec.task) for spec in recipe.models]
    coefficients_file = params["coefficients"]
    runs_network = not coefficients_file and settings.iterations > 0
    data_tasks: list[str] = []
    if runs_network:
        data_tasks = list(dict.fromkeys(task for task in tasks if recipe.data is not None and task in recipe.data))
        if not data_tasks:
            raise RecipeError(["frank_wolfe computes its gradient on labelled examples: add a `data:` section "
                               "with a JSON Lines file of {\"prompt\", \"answer\"} rows for at least one task, "
                               "or set `iterations: 0`"])

    # The model's weights and their gradient in float32, plus a few tensors in flight per candidate.
    # The activations of one batch come on top.
    merged_numel = sum(math.prod(job.output.shape) for job in merged)
    largest = max(math.prod(job.output.shape) for job in merged)
    in_flight = (len(plan.models) + 3) * largest * 4
    if runs_network:
        memory, contents = 2 * merged_numel * 4 + in_flight, "the merge and its gradient"
    elif not settings.linear:
        memory, contents = merged_numel * 4 + in_flight, "the initial merge"
    else:
        memory, contents = in_flight, "a few tensors per candidate"

    def run_phase(plan: Any, *, device: torch.device, progress: bool) -> Any:
        return _run(recipe, plan, settings, tasks, data_tasks, device=device)

    return FrankWolfePhase(memory_bytes=memory, memory_contents=contents, run_phase=run_phase)


def _run(recipe: Any, plan: Any, settings: Settings, tasks: list[str], data_tasks: list[str], *,
         device: torch.device) -> Any:
    merged = [job for job in plan.jobs if job.action == "merge"]
    names = [job.name for job in merged]
    params = merged[0].params
    labels = _vertex_labels(tasks, hard=settings.variant == "hard")
    candidates = [{"label": label, "model": spec.model, "task": task, "data": task in data_tasks}
                  for label, spec, task in zip(labels, recipe.models, tasks)]
    started = time.perf_counter()

    # 1. Coefficients from an earlier run need no iterations.
    if params["coefficients"]:
        rows = _load_coefficients(Path(params["coefficients"]), names, len(tasks))
        record = FrankWolfeRecord(settings, candidates, labels, names, [], {}, rows)
        return _with_coefficients(plan, rows, record)

    # 2. The iterations, on the weights of the base's transformers model. Without iterations there is
    #    no gradient to take, and a linear θ⁽⁰⁾ needs no weights at all.
    frank_wolfe = FrankWolfe(PlanInputs(merged, device), settings)
    record = FrankWolfeRecord(settings, candidates, labels, names, frank_wolfe.records, {}, None)
    loss = None
    current = None
    if settings.iterations > 0:
        loss = _labelled_loss(recipe, plan, names, data_tasks, device)
        current = loss.tensors
    elif not settings.linear:
        current = {job.name: torch.empty(job.output.shape, dtype=torch.float32, device=device) for job in merged}
    if current is not None:
        frank_wolfe.start(current)
    for iteration in range(settings.iterations):
        step_started = time.perf_counter()
        done = frank_wolfe.iterate(iteration, current, loss.gradient, data_tasks)
        logger.info("frank_wolfe iteration %d/%d in %.1f s: loss %s; picked %s; step %.4g", iteration + 1,
                    settings.iterations, time.perf_counter() - step_started, _format_losses(done.losses),
                    record.summary(done), done.step * settings.scaling)
    if settings.linear:
        rows = [(frank_wolfe.rows[name] if current is not None else frank_wolfe.initial_row()).tolist()
                for name in names]
        record.coefficients = rows
    if loss is not None:
        loss.network.zero_grad(set_to_none=True)
        record.final_losses = loss.losses()
        logger.info("frank_wolfe final loss %s", _format_losses(record.final_losses))
    record.seconds = time.perf_counter() - started
    logger.info("frank_wolfe learning done in %.1f s", record.seconds)

    # 3. The merge pass: a linear combination per tensor, or the learned weights themselves.
    if settings.linear:
        return _with_coefficients(plan, record.coefficients, record)
    return _with_learned_weights(plan, current, record)


def _vertex_labels(tasks: Sequence[str], *, hard: bool) -> list[str]:
    """Name each candidate by its task, numbered when tasks repeat, and θ⁽⁰⁾ "initial" in the hard variant."""
    labels = []
    for index, task in enumerate(tasks):
        labels.append(task if tasks.count(task) == 1 else f"{task}#{index}")
    return labels + ([INITIAL_LABEL] if hard else [])


def _format_losses(losses: Mapping[str, float]) -> str:
    if not losses:
        return "-"
    mean = math.fsum(losses.values()) / len(losses)
    return f"{mean:.4f} (" + ", ".join(f"{task} {value:.4f}" for task, value in losses.items()) + ")"


def _labelled_loss(recipe: Any, plan: Any, names: Sequence[str], data_tasks: Sequence[str],
                   device: torch.device) -> LabelledLoss:
    """Read the labelled examples, build the base's transformers model, and map the merged tensors to its weights."""
    from transformers import AutoTokenizer

    from mergekit_plus.zoo.evaluate import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_source.folder)
    examples = {}
    for task in data_tasks:
        entry = recipe.data[task]
        try:
            rows = read_labelled_rows(entry.path)
        except ValueError as error:
            raise InputError(str(error), hint=f"fix the data file of task {task}") from error
        rows = rows[: entry.samples or DEFAULT_SAMPLES]
        encoded = [encode_example(tokenizer, row["prompt"], row["answer"], max_length=entry.max_length) for row in rows]
        examples[task] = TaskExamples(encoded, entry.batch_size)

    # NOTE: the CUDA path (`merge run --device cuda`) has only been run on CPU so far.
    network = load_causal_lm(plan.base.source.folder).to(device)
    network.eval()
    network.requires_grad_(True)
    state = network.state_dict(keep_vars=True)
    unknown = [name for name in names if name not in state]
    if unknown:
        raise InputError(f"the base's transformers model has no tensor named {', '.join(unknown[:3])}"
                         f"{' and more' if len(unknown) > 3 else ''}, so frank_wolfe cannot compute its gradient",
                         hint="merge checkpoints whose tensor names match their transformers class")
    tensors = {name: state[name] for name in names}
    shared = _shared_storage(tensors)
    if shared:
        raise InputError(f"tensors {shared[0]} and {shared[1]} are one weight in the base's transformers model "
                         "(tied), but the merge stores both", hint="merge checkpoints whose config matches their "
                         "stored tensors (tie_word_embeddings)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return LabelledLoss(network, tensors, examples, pad_id=pad, device=device)


def _shared_storage(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    seen: dict[int, str] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        pointer = tensor.data_ptr()
        if pointer in seen:
            return seen[pointer], name
        seen[pointer] = name
    return None


def _with_coefficients(plan: Any, rows: Sequence[Sequence[float]], record: FrankWolfeRecord) -> Any:
    """Return the plan with each merged tensor's coefficients in its parameters."""
    by_name = {name: row for name, row in zip(record.tensors, rows)}
    jobs = []
    for job in plan.jobs:
        if job.action != "merge":
            jobs.append(job)
            continue
        row = by_name[job.name]
        model_params = tuple({**mp, "coefficient": float(row[index + 1])} for index, mp in enumerate(job.model_params))
        # b is only needed when it differs from 1 − Σ cᵢ, after a step toward the zero tensor.
        base_coefficient = None if math.isclose(math.fsum(row), 1.0, abs_tol=1e-9) else float(row[0])
        jobs.append(dataclasses.replace(job, model_params=model_params,
                                        params={**job.params, "base_coefficient": base_coefficient}))
    return dataclasses.replace(plan, jobs=tuple(jobs), learned=record)


class LearnedWeights:
    """A reader over weights in memory, so that the merge pass writes them like tensors read from disk."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], infos: Mapping[str, Any]) -> None:
        self._tensors = tensors
        self.tensors = dict(infos)
        self.config = None

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


def _with_learned_weights(plan: Any, current: Mapping[str, torch.Tensor], record: FrankWolfeRecord) -> Any:
    """Return the plan with each merged tensor read from the learned weights, with no base."""
    from mergekit_plus.io.reader import TensorInfo
    from mergekit_plus.io.sources import ModelSource
    from mergekit_plus.plan import InputModel, TensorRead

    infos = {name: TensorInfo(name, torch.float32, tuple(tensor.shape), Path("<memory>"), 0,
                              tensor.numel() * 4) for name, tensor in current.items()}
    source = ModelSource(reference="frank_wolfe result in memory", folder=plan.base.source.folder)
    learned = InputModel(role="learned", index=-1, source=source, reader=LearnedWeights(current, infos))
    jobs = []
    for job in plan.jobs:
        if job.action != "merge":
            jobs.append(job)
            continue
        jobs.append(dataclasses.replace(job, base=None, models=(TensorRead(learned, infos[job.name]),),
                                        model_params=(job.model_params[0],)))
    return dataclasses.replace(plan, jobs=tuple(jobs), learned=record)


def _load_coefficients(path: Path, names: Sequence[str], count: int) -> list[list[float]]:
    if not path.is_file():
        raise InputError(f"coefficients file {path} not found",
                         hint=f"set `coefficients:` to the {RECORD_FILE} of an earlier frank_wolfe merge")
    data = json.loads(path.read_text(encoding="utf-8"))
    coefficients = data.get("coefficients")
    if not coefficients:
        raise InputError(f"coefficients file {path} has no coefficients (a merge_fn ties run writes none)",
                         hint="use the file of a merge_fn task_arithmetic run")
    values = coefficients["values"]
    if data.get("tensors") != list(names) or any(len(row) != count + 1 for row in values):
        raise InputError(f"coefficients file {path} does not match this merge: it has {len(data.get('tensors', []))} "
                         f"tensors and {len(values[0]) - 1 if values else 0} models, the merge {len(names)} tensors "
                         f"and {count} models", hint="learn them again for these models")
    return values
