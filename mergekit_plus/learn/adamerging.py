"""The AdaMerging learning phase: entropy minimisation over merge coefficients, before the merge.

The phase keeps the base and every task vector of the merged tensors in memory, in float32 on the
merge device, and builds a `transformers` model from the base folder. The merged weights are a
differentiable function of the coefficients, evaluated with `torch.func.functional_call`, so only
the coefficients receive gradients.

Objective for causal LMs, per task and mini-batch of prompts:
1. Decode the merged model's greedy answer of `answer_tokens` tokens, without gradients.
2. Run the prompt followed by that answer through the merged model (teacher forcing), and take the
   entropy of the next-token distribution at every answer position (`positions: answer`), up to
   and including the one that predicts end-of-sequence, or at the first one only (`positions: first`).
3. Average over positions and prompts; sum over tasks; one Adam step on the coefficients.

Objective for sequence classifiers (every model's config names a `...ForSequenceClassification`
architecture, such as BERT fine-tunes of a bare `BertModel` base), as in the AdaMerging paper:
each task keeps its own classification head. Per task and mini-batch of unlabelled texts, the
task's fine-tune (its config, head and every tensor outside the merge) runs with the merged
tensors in place of its own, and the loss is the entropy of softmax(logits), averaged over the
texts and summed over tasks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_plus.errors import InputError, RecipeError
from mergekit_plus.learn.data import read_rows, read_texts, task_of_model
from mergekit_plus.methods.adamerging import ties_process

logger = logging.getLogger(__name__)

COEFFICIENTS_FILE = "adamerging_coefficients.json"
HEATMAP_FILE = "adamerging_coefficients.png"
CLASSIFIER_TEXT_FIELD = "text"
CAUSAL_LM_PARAMETERS = ("positions", "answer_tokens")
"""Parameters of the causal LM objective, which a classifier's label entropy has no use for."""


@dataclasses.dataclass
class LearnedCoefficients:
    """Coefficients of every model for every merged tensor, and TIES trim thresholds when used."""

    tasks: list[str]
    tensors: list[str]
    values: list[list[float]]
    """values[k][i]: coefficient of model i for tensor k."""
    thresholds: list[float] | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    granularity: str = "layer"

    def to_json(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "tasks": self.tasks, "tensors": self.tensors, "coefficients": self.values,
                "thresholds": self.thresholds, "losses": self.losses}

    @classmethod
    def from_json(cls, path: Path) -> LearnedCoefficients:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["tasks"], data["tensors"], data["coefficients"], data.get("thresholds"),
                   data.get("losses", []), data.get("granularity", "layer"))


@dataclasses.dataclass(frozen=True)
class TaskPrompts:
    """One task's unlabelled prompts, with its batch size and maximum prompt length in tokens."""

    texts: list[str]
    batch_size: int
    max_length: int


@dataclasses.dataclass(frozen=True)
class TaskClassifier:
    """One task's fine-tuned sequence classifier, and the prefix of the merged tensors' names in it."""

    network: torch.nn.Module
    prefix: str


@dataclasses.dataclass
class LearningPhase:
    """The learning phase of a plan: its memory estimate and the function that runs it."""

    memory_bytes: int
    run_phase: Any
    memory_contents: str = "base and task vectors"
    """The contents that `memory_bytes` counts, named in the planner's log line."""

    def run(self, plan: Any, *, device: torch.device, progress: bool) -> Any:
        """Learn the coefficients and return the plan with them in every merged tensor's parameters."""
        return self.run_phase(plan, device=device, progress=progress)


def plan_adamerging(recipe: Any, plan: Any) -> LearningPhase | None:
    """Return the learning phase of an AdaMerging plan, or None when the recipe sets every coefficient.

    Raise RecipeError when coefficients are needed but the recipe has neither `data:` nor a
    `coefficients` file, or a model has no data entry.
    """
    merged = [job for job in plan.jobs if job.action == "merge"]
    params = merged[0].params if merged else {}
    coefficients_given = all(mp["coefficient"] is not None for job in merged for mp in job.model_params)
    needs_thresholds = params.get("task_vectors") == "ties"
    if params.get("steps") == 0 and not params.get("coefficients") and not coefficients_given and not needs_thresholds:
        # With no step to take, every coefficient is the initial value: no data is read and no model is built.
        initial = float(params["init"])
        if params.get("clamp"):
            initial = min(max(initial, 0.0), 1.0)
        return LearningPhase(memory_bytes=0, run_phase=lambda plan, **_: _with_coefficients(plan, initial))
    if coefficients_given and not needs_thresholds:
        return None
    if any(job.row_maps is not None for job in merged):
        raise RecipeError(["adamerging cannot learn coefficients with `tokenizer.vocab: align`; merge models "
                           "with the same vocabulary"])
    coefficients_file = params.get("coefficients") or ""
    if not coefficients_file and not coefficients_given and recipe.data is None:
        raise RecipeError(["adamerging learns its coefficients from prompts: add a `data:` section with one entry "
                           "per task, or set `coefficients:` to a coefficients JSON file of an earlier run"])
    tasks = [task_of_model(spec.model, spec.task) for spec in recipe.models]
    learns = not coefficients_file and not coefficients_given
    if learns:
        missing = [task for task in tasks if task not in recipe.data]
        if missing:
            raise RecipeError([f"`data:` has no entry for task(s) {', '.join(missing)}; add one per model"])
    classifiers = learns and _are_classifiers(plan)
    if classifiers:
        unused = [name for name in CAUSAL_LM_PARAMETERS if name in recipe.parameters]
        if unused:
            raise RecipeError([f"`{name}` sets the causal LM objective, but the models are sequence classifiers, "
                               f"whose entropy is that of their labels; remove it" for name in unused])
    # A classifier's texts are read now, so that a bad row is reported before any tensor is read.
    texts = _read_classifier_texts(recipe, tasks) if classifiers else None

    # Base and T task vectors in float32, plus the T classifiers when they learn. Activations come on top.
    merged_numel = sum(math.prod(job.output.shape) for job in merged)
    memory = (len(plan.models) + 2) * merged_numel * 4
    if texts is not None:
        memory += len(plan.models) * merged_numel * 4

    def run_phase(plan: Any, *, device: torch.device, progress: bool) -> Any:
        return _run(recipe, plan, tasks, coefficients_given=coefficients_given, texts=texts, device=device,
                    progress=progress)

    contents = "base, task vectors and task classifiers" if texts is not None else "base and task vectors"
    return LearningPhase(memory_bytes=memory, run_phase=run_phase, memory_contents=contents)


def _with_coefficients(plan: Any, value: float) -> Any:
    """Return the plan with `value` as every model's coefficient in every merged tensor."""
    jobs = tuple(job if job.action != "merge" else
                 dataclasses.replace(job, model_params=tuple({**mp, "coefficient": value} for mp in job.model_params))
                 for job in plan.jobs)
    return dataclasses.replace(plan, jobs=jobs)


def _are_classifiers(plan: Any) -> bool:
    """Tell whether every model is a sequence classifier, whose heads give the classifier objective.

    Raise InputError when only some of them are.
    """
    from mergekit_plus.zoo.evaluate import SEQUENCE_CLASSIFICATION, model_kind

    kinds = [model_kind(model.reader.config) == SEQUENCE_CLASSIFICATION for model in plan.models]
    if all(kinds):
        return True
    if any(kinds):
        named = ", ".join(model.source.label for model, kind in zip(plan.models, kinds) if kind)
        raise InputError(f"adamerging learns on sequence classifiers or on causal LMs, but only some models are "
                         f"sequence classifiers: {named}",
                         hint="merge fine-tunes that all have a ...ForSequenceClassification config, or none")
    return False


def _run(recipe: Any, plan: Any, tasks: list[str], *, coefficients_given: bool, texts: list[TaskPrompts] | None,
         device: torch.device, progress: bool) -> Any:
    merged = [job for job in plan.jobs if job.action == "merge"]
    params = dict(merged[0].params)
    names = [job.name for job in merged]
    started = time.perf_counter()

    # 1. Task vectors in memory, and TIES thresholds for AdaMerging++.
    base, vectors = _read_task_vectors(merged, device)
    thresholds = None
    if params["task_vectors"] == "ties":
        thresholds = trim_thresholds(vectors, params["density"])
        vectors = _ties_vectors(vectors, thresholds)

    # 2. Coefficients: from the recipe, from a file, or learned.
    if coefficients_given:
        values = [[mp["coefficient"] for mp in job.model_params] for job in merged]
        learned = LearnedCoefficients(tasks, names, values, thresholds)
    elif params["coefficients"]:
        learned = _load_coefficients(Path(params["coefficients"]), tasks, names)
        learned.thresholds = thresholds
    elif texts is not None:
        classifiers = _load_classifiers(plan, names, device)
        learned = learn_classifier_coefficients(classifiers, _load_tokenizer(plan), base, vectors, texts,
                                                params=params, seed=recipe.seed, device=device, progress=progress)
        learned = dataclasses.replace(learned, tasks=tasks, tensors=names, thresholds=thresholds)
    else:
        prompts = _read_prompts(recipe, tasks)
        network = _load_network(plan, device)
        unknown = sorted(set(names) - set(network.state_dict()))
        if unknown:
            raise InputError(f"the base's transformers model has no tensor named {', '.join(unknown[:3])}"
                             f"{' and more' if len(unknown) > 3 else ''}, so adamerging cannot learn its coefficient",
                             hint="merge checkpoints whose tensor names match their transformers class")
        learned = learn_coefficients(network, _load_tokenizer(plan), base, vectors, prompts,
                                     params=params, seed=recipe.seed, device=device, progress=progress)
        learned = dataclasses.replace(learned, tasks=tasks, tensors=names, thresholds=thresholds)
    learned = dataclasses.replace(learned, granularity=params["granularity"])
    logger.info("adamerging coefficients ready in %.1f s:\n%s", time.perf_counter() - started, format_table(learned))

    # 3. The merge pass reads the coefficients from each tensor's per-model parameters.
    jobs = []
    row = dict(zip(names, learned.values))
    for job in plan.jobs:
        if job.action != "merge":
            jobs.append(job)
            continue
        model_params = tuple({**mp, "coefficient": float(row[job.name][i]),
                              "threshold": None if thresholds is None else float(thresholds[i])}
                             for i, mp in enumerate(job.model_params))
        jobs.append(dataclasses.replace(job, model_params=model_params))
    return dataclasses.replace(plan, jobs=tuple(jobs), learned=learned)


def _read_task_vectors(merged: Sequence[Any], device: torch.device) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base: dict[str, torch.Tensor] = {}
    vectors: list[dict[str, torch.Tensor]] = [{} for _ in merged[0].models] if merged else []
    for job in merged:
        theta0 = job.base.input.reader.read(job.base.info.name).to(device=device, dtype=torch.float32)
        base[job.name] = theta0
        for index, read in enumerate(job.models):
            vectors[index][job.name] = read.input.reader.read(read.info.name).to(device=device, dtype=torch.float32) - theta0
    return base, vectors


def trim_thresholds(vectors: Sequence[dict[str, torch.Tensor]], density: float) -> list[float]:
    """Return each model's TIES trim threshold over its whole flattened task vector.

    The threshold q is the (d − ⌊density · d⌋)-th smallest |τ|, so ⌊density · d⌋ + 1 entries and the ties
    at q are kept, as in the `ties` method. Density 1 gives q = 0 (keep all), density 0 gives +inf (keep none).
    """
    thresholds = []
    for vector in vectors:
        magnitudes = torch.cat([tensor.abs().reshape(-1) for tensor in vector.values()])
        d = magnitudes.numel()
        rank = d - math.floor(density * d + 1e-9)
        if density == 0:
            thresholds.append(math.inf)
        elif rank <= 0:
            thresholds.append(0.0)
        else:
            thresholds.append(float(torch.kthvalue(magnitudes.cpu(), rank).values))
    return thresholds


def _ties_vectors(vectors: list[dict[str, torch.Tensor]], thresholds: list[float]) -> list[dict[str, torch.Tensor]]:
    processed: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for name in vectors[0]:
        for index, tensor in enumerate(ties_process([vector[name] for vector in vectors], thresholds)):
            processed[index][name] = tensor
    return processed


def learn_coefficients(network: torch.nn.Module, tokenizer: Any, base: dict[str, torch.Tensor],
                       vectors: Sequence[dict[str, torch.Tensor]], prompts: Sequence[TaskPrompts], *,
                       params: dict[str, Any], seed: int, device: torch.device,
                       progress: bool = False) -> LearnedCoefficients:
    """Minimise a causal LM's answer entropy on every task's prompts over the merge coefficients.

    `prompts[i]` contains the prompts of the task of `vectors[i]`, already cut to the data's sample count,
    with that task's batch size and maximum prompt length in tokens. Returns the final coefficients,
    clamped to [0, 1] when `params["clamp"]`.
    """
    network.requires_grad_(False)
    network.eval()

    def batch_entropy(task: int, weights: dict[str, torch.Tensor], batch: list[str]) -> torch.Tensor:
        return answer_entropy(network, weights, tokenizer, batch, params=params,
                              max_length=prompts[task].max_length, device=device)

    return _minimise_entropy(batch_entropy, base, vectors, prompts, params=params, seed=seed, device=device,
                             progress=progress)


def learn_classifier_coefficients(classifiers: Sequence[TaskClassifier], tokenizer: Any,
                                  base: dict[str, torch.Tensor], vectors: Sequence[dict[str, torch.Tensor]],
                                  texts: Sequence[TaskPrompts], *, params: dict[str, Any], seed: int,
                                  device: torch.device, progress: bool = False) -> LearnedCoefficients:
    """Minimise every task's classification entropy on its own texts over the merge coefficients.

    `classifiers[i]` is the fine-tune of the task of `vectors[i]`, which keeps its own head, and
    `texts[i]` contains that task's unlabelled texts with its batch size and maximum length in tokens.
    Returns the final coefficients, clamped to [0, 1] when `params["clamp"]`.
    """
    if tokenizer.pad_token_id is None:
        raise InputError("the tokenizer has no padding token, so adamerging cannot batch the classifiers' texts",
                         hint="use a tokenizer source whose tokenizer sets pad_token")
    for classifier in classifiers:
        classifier.network.requires_grad_(False)
        classifier.network.eval()

    def batch_entropy(task: int, weights: dict[str, torch.Tensor], batch: list[str]) -> torch.Tensor:
        classifier = classifiers[task]
        named = {classifier.prefix + name: tensor for name, tensor in weights.items()}
        return classification_entropy(classifier.network, named, tokenizer, batch,
                                      max_length=texts[task].max_length, device=device)

    return _minimise_entropy(batch_entropy, base, vectors, texts, params=params, seed=seed, device=device,
                             progress=progress)


def _minimise_entropy(batch_entropy: Callable[[int, dict[str, torch.Tensor], list[str]], torch.Tensor],
                      base: dict[str, torch.Tensor], vectors: Sequence[dict[str, torch.Tensor]],
                      data: Sequence[TaskPrompts], *, params: dict[str, Any], seed: int, device: torch.device,
                      progress: bool) -> LearnedCoefficients:
    """Run the Adam steps: per step, the sum over tasks of `batch_entropy(task, merged weights, batch)`."""
    names = list(base)
    count = len(vectors)
    rows = 1 if params["granularity"] == "task" else len(names)
    raw = torch.full((rows, count), float(params["init"]), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=params["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    stacked = {name: torch.stack([vector[name] for vector in vectors]) for name in names}
    generator = random.Random(seed)
    losses: list[float] = []

    for step in range(params["steps"]):
        optimizer.zero_grad()
        weights = _merged_weights(raw, base, stacked, clamp=params["clamp"])
        total = torch.zeros((), device=device)
        for index, task in enumerate(data):
            for _ in range(params["batches_per_step"]):
                batch = generator.sample(task.texts, min(task.batch_size, len(task.texts)))
                total = total + batch_entropy(index, weights, batch)
        total.backward()
        optimizer.step()
        losses.append(total.item())
        if step % (10 if progress else 50) == 0 or step == params["steps"] - 1:
            logger.info("adamerging step %d/%d: entropy %.4f", step + 1, params["steps"], losses[-1])

    final = raw.detach().clamp(0.0, 1.0) if params["clamp"] else raw.detach()
    values = final.expand(len(names), count).tolist()
    return LearnedCoefficients([], names, values, losses=losses)


def _merged_weights(raw: torch.Tensor, base: dict[str, torch.Tensor], stacked: dict[str, torch.Tensor], *,
                    clamp: bool) -> dict[str, torch.Tensor]:
    """Return θ₀ + Σᵢ λᵢ τᵢ per tensor, differentiable in `raw` (one row, or one row per tensor)."""
    coefficients = raw.clamp(0.0, 1.0) if clamp else raw
    weights = {}
    for index, (name, theta0) in enumerate(base.items()):
        row = coefficients[0 if coefficients.shape[0] == 1 else index]
        weights[name] = theta0 + torch.tensordot(row, stacked[name], dims=1)
    return weights


def answer_entropy(network: torch.nn.Module, weights: dict[str, torch.Tensor], tokenizer: Any,
                   prompts: Sequence[str], *, params: dict[str, Any], max_length: int,
                   device: torch.device) -> torch.Tensor:
    """Return the mean next-token entropy at the answer positions of the merged model's greedy answers."""
    from torch.func import functional_call

    # Right padding: causal attention keeps the pads after a row's end out of that row's positions.
    encoded = [tokenizer(prompt)["input_ids"][-max_length:] for prompt in prompts]
    lengths = torch.tensor([len(ids) for ids in encoded], device=device)
    steps = params["answer_tokens"] if params["positions"] == "answer" else 1
    width = int(lengths.max()) + steps
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long, device=device)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
    rows = torch.arange(len(encoded), device=device)

    # 1. Greedy answer, without gradients; the last answer token needs no further forward pass.
    live = torch.ones(len(encoded), dtype=torch.bool, device=device)
    valid = torch.zeros((len(encoded), steps), dtype=torch.bool, device=device)
    with torch.no_grad():
        for position in range(steps):
            valid[:, position] = live
            if position == steps - 1:
                break
            logits = functional_call(network, weights, args=(), kwargs={"input_ids": ids}).logits
            next_ids = logits[rows, lengths - 1 + position].argmax(-1)
            ids[rows, lengths + position] = torch.where(live, next_ids, pad)
            if tokenizer.eos_token_id is not None:
                live &= next_ids != tokenizer.eos_token_id

    # 2. Teacher-forced pass on prompt + answer, with gradients to the coefficients.
    logits = functional_call(network, weights, args=(), kwargs={"input_ids": ids}).logits
    positions = lengths[:, None] - 1 + torch.arange(steps, device=device)[None, :]
    picked = logits[rows[:, None], positions]
    log_probs = torch.log_softmax(picked.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return (entropy * valid).sum() / valid.sum()


def classification_entropy(network: torch.nn.Module, weights: dict[str, torch.Tensor], tokenizer: Any,
                           texts: Sequence[str], *, max_length: int, device: torch.device) -> torch.Tensor:
    """Return the mean entropy of the classifier's label distribution, softmax(logits), over `texts`.

    `weights` replaces the network's tensors of the same names, and the rest (the head) stays its own.
    Each text is cut to its first `max_length` tokens.
    """
    from torch.func import functional_call

    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    logits = functional_call(network, weights, args=(), kwargs=dict(batch.to(device))).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def _read_classifier_texts(recipe: Any, tasks: list[str]) -> list[TaskPrompts]:
    texts = []
    for task in tasks:
        entry = recipe.data[task]
        path = Path(entry.path)
        if path.is_dir() and (path / "dataset_info.json").is_file():
            raise InputError(f"data of task {task}: {path} is a saved Hugging Face dataset, but adamerging reads "
                             "a classifier's texts from JSON Lines or text files only",
                             hint=f'export its texts to JSON Lines rows with a "{CLASSIFIER_TEXT_FIELD}" key')
        try:
            rows = read_texts(path, fields=(CLASSIFIER_TEXT_FIELD,), limit=entry.samples)
        except ValueError as error:
            raise InputError(str(error), hint=f'give every row of the data file of task {task} a string '
                             f'"{CLASSIFIER_TEXT_FIELD}"; a classifier learns from texts, not prompts') from error
        if not rows:
            raise InputError(f"data of task {task}: {path} contains no rows", hint="add unlabelled texts to it")
        texts.append(TaskPrompts(rows, entry.batch_size, entry.max_length))
    return texts


def _read_prompts(recipe: Any, tasks: list[str]) -> list[TaskPrompts]:
    prompts = []
    for task in tasks:
        entry = recipe.data[task]
        try:
            rows = read_rows(entry.path)
        except ValueError as error:
            raise InputError(str(error), hint=f"fix the data file of task {task}") from error
        texts = [row["prompt"] for row in rows]
        if entry.samples is not None:
            texts = texts[: entry.samples]
        prompts.append(TaskPrompts(texts, entry.batch_size, entry.max_length))
    return prompts


def _load_network(plan: Any, device: torch.device) -> torch.nn.Module:
    # NOTE: the CUDA path (`merge run --device cuda`) has only been run on CPU so far.
    from mergekit_plus.zoo.evaluate import load_causal_lm

    return load_causal_lm(plan.base.source.folder).to(device)


def _load_classifiers(plan: Any, names: list[str], device: torch.device) -> list[TaskClassifier]:
    """Load every model's fine-tune, head included, and check that it has every merged tensor."""
    from mergekit_plus.zoo.evaluate import SEQUENCE_CLASSIFICATION, load_scoring_model

    classifiers = []
    for model in plan.models:
        network = load_scoring_model(model.source.folder, SEQUENCE_CLASSIFICATION).to(device)
        own = network.state_dict()
        unknown = [name for name in names if model.prefix + name not in own]
        if unknown:
            raise InputError(f"the sequence classifier of {model.label} has no tensor named "
                             f"{model.prefix + unknown[0]} ({len(unknown)} merged tensors missing in all), so "
                             "adamerging cannot run it with the merged tensors",
                             hint="merge checkpoints whose tensor names match their transformers class")
        classifiers.append(TaskClassifier(network, model.prefix))
    return classifiers


def _load_tokenizer(plan: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(plan.tokenizer_source.folder)


def _load_coefficients(path: Path, tasks: list[str], names: list[str]) -> LearnedCoefficients:
    if not path.is_file():
        raise InputError(f"coefficients file {path} not found", hint="set `coefficients:` to the "
                         f"{COEFFICIENTS_FILE} of an earlier adamerging merge")
    learned = LearnedCoefficients.from_json(path)
    if learned.tensors != names or any(len(row) != len(tasks) for row in learned.values):
        raise InputError(f"coefficients file {path} does not match this merge: it has {len(learned.tensors)} "
                         f"tensors and {len(learned.values[0]) if learned.values else 0} models, the merge "
                         f"{len(names)} tensors and {len(tasks)} models", hint="learn them again for these models")
    return learned


def format_table(learned: LearnedCoefficients) -> str:
    """Render the coefficients as a fixed-width table: one row per tensor (one row when task-wise)."""
    rows = list(zip(learned.tensors, learned.values))
    if learned.granularity == "task" and rows:
        rows = [("all tensors", rows[0][1])]
    width = max([len("tensor"), *(len(name) for name, _ in rows)])
    lines = [f"{'tensor':<{width}}  " + "  ".join(f"{task:>12}" for task in learned.tasks)]
    for name, values in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{value:12.4f}" for value in values))
    return "\n".join(lines)


def write_coefficients(learned: LearnedCoefficients, folder: Path) -> list[str]:
    """Write the coefficients JSON and a heat map PNG (tensors by tasks) into `folder`; return the file names."""
    (folder / COEFFICIENTS_FILE).write_text(json.dumps(learned.to_json(), indent=2),
                                            encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    height = max(2.0, 0.22 * len(learned.tensors) + 1.0)
    figure, axes = pyplot.subplots(figsize=(2.0 + 1.1 * len(learned.tasks), height))
    image = axes.imshow(learned.values, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(learned.tasks)), learned.tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(learned.tensors)), learned.tensors, fontsize=6)
    axes.set_title("AdaMerging coefficients")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(folder / HEATMAP_FILE, dpi=100)
    pyplot.close(figure)
    return [COEFFICIENTS_FILE, HEATMAP_FILE]
