"""Score a checkpoint on labelled examples, and on the zoo's tasks with accuracy normalised by the fine-tunes.

Two kinds of model are scored, each on its own rows of a JSON Lines file:

- a causal LM (`...ForCausalLM`) on {"prompt", "answer"} rows, by exact match of its greedy answer;
- a sequence classifier (`...ForSequenceClassification`) on {"text", "label"} rows, by accuracy of
  the arg-max label.

`merge eval` scores the zoo's tasks this way. The normalised accuracy of a task is the model's
accuracy divided by the accuracy of that task's own fine-tune, as the model-merging papers report
it; 1.0 means the merge kept all of the fine-tune's skill.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_plus.errors import InputError
from mergekit_plus.zoo.build import load_manifest

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
ROW_KEYS = {CAUSAL_LM: ("prompt", "answer"), SEQUENCE_CLASSIFICATION: ("text", "label")}
"""The keys of a labelled row, by model kind."""
METRICS = {CAUSAL_LM: "exact match of the greedy answer", SEQUENCE_CLASSIFICATION: "accuracy"}
EVAL_BATCH_SIZE = 256


def model_family(model: Path, manifest: dict) -> str:
    """Name the zoo family a checkpoint belongs to, from its config (or its adapter's base)."""
    if not model.is_dir():
        raise InputError(f"model folder {model} not found", hint="pass a folder written by save_pretrained or `merge run`")
    if (model / "adapter_config.json").is_file():
        return "lm"
    config_path = model / "config.json"
    if not config_path.is_file():
        checkpoints = sorted(path.name for path in model.glob("checkpoint-*") if path.is_dir())
        hint = (f"this looks like a training run: pass one of its checkpoints, such as {model / checkpoints[-1]}"
                if checkpoints else "pass a folder written by save_pretrained or `merge run`")
        raise InputError(f"{model} has no config.json", hint=hint)
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    family = "encoder" if model_type == "bert" else "lm"
    if family not in manifest["families"]:
        raise InputError(f"{model} is a {model_type} model, but the zoo has no {family} family",
                         hint="build the bench zoo (`merge zoo build --size bench`), which has the encoder family")
    return family


def evaluate(model: Path, zoo: Path, tasks: list[str] | None = None) -> dict:
    """Evaluate `model` on `tasks` (default: every task of its family) and return the report as a dict."""
    model, zoo = Path(model), Path(zoo)
    manifest = load_manifest(zoo)
    family_name = model_family(model, manifest)
    family = manifest["families"][family_name]
    known = family["tasks"]
    selected = list(known) if tasks is None else tasks
    if not selected:
        raise InputError("no task selected", hint=f"pass --tasks zoo, or names from: {', '.join(known)}")
    unknown = [name for name in selected if name not in known]
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise InputError(f"unknown task{'s' if len(unknown) > 1 else ''} {names} for the {family_name} family",
                         hint=f"choose from: {', '.join(known)}, or `zoo` for all of them")

    if family_name == "lm":
        scores = _evaluate_lm(model, family, zoo, selected)
    else:
        from mergekit_plus.zoo.encoder import evaluate_encoder

        scores = evaluate_encoder(model, family, zoo, selected)

    rows = {}
    for name in selected:
        fine_tune = family["accuracy"]["fine_tunes"][name]
        score = scores[name]["accuracy"]
        rows[name] = {"accuracy": score, "normalized": score / fine_tune if fine_tune else None,
                      "fine_tune": fine_tune, "base": family["accuracy"]["base"][name],
                      "examples": scores[name]["examples"]}
    normalized = [row["normalized"] for row in rows.values() if row["normalized"] is not None]
    return {
        "model": str(model),
        "zoo": str(zoo),
        "family": family_name,
        "tasks": rows,
        "average": {
            "accuracy": sum(row["accuracy"] for row in rows.values()) / len(rows),
            "normalized": sum(normalized) / len(normalized) if normalized else None,
        },
    }


def _evaluate_lm(model: Path, family: dict, zoo: Path, tasks: list[str]) -> dict[str, dict]:
    from transformers import AutoTokenizer

    network = load_causal_lm(model)
    # Every checkpoint of the family shares the base's character-level tokenizer, and an adapter
    # folder or a merge written without side files has none of its own.
    tokenizer = AutoTokenizer.from_pretrained(zoo / family["base"])
    scores = {}
    for name in tasks:
        examples = read_labelled_examples(zoo / family["eval_data"][name], CAUSAL_LM)
        score = score_examples(network, tokenizer, examples, kind=CAUSAL_LM, batch_size=EVAL_BATCH_SIZE)
        scores[name] = {"accuracy": score.accuracy, "examples": score.examples}
    return scores


def load_causal_lm(model: Path) -> torch.nn.Module:
    """Load a causal LM in float32, or a base with a PEFT adapter when `model` is an adapter folder."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    adapter_config = model / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
        # Zoo adapters name their base relative to the adapter folder.
        base_folder = (model / base_path) if not Path(base_path).is_absolute() else Path(base_path)
        if not (base_folder / "config.json").is_file():
            raise InputError(f"the base model of adapter {model} is not at {base_folder}",
                             hint="set base_model_name_or_path in adapter_config.json to the base's folder")
        base = _load_complete(AutoModelForCausalLM, base_folder)
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers method that transformers 5 deprecates; nothing to act on here.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(base, model).eval()
    return _load_complete(AutoModelForCausalLM, model).eval()


def _load_complete(auto_class, folder: Path) -> torch.nn.Module:
    """Load with transformers, rejecting a checkpoint whose weights are missing or incomplete.

    transformers fills missing tensors with fresh random values and only logs it, which would score
    a broken checkpoint as if it were a model.
    """
    try:
        network, info = auto_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except OSError as error:
        raise InputError(f"cannot load {folder}: {error}", hint="pass a complete checkpoint folder") from error
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{folder} lacks {len(missing)} tensor(s) of its architecture: {shown}",
                         hint="the checkpoint is incomplete; rebuild or re-download it")
    return network


def model_kind(config: dict[str, Any] | None) -> str | None:
    """Name the kind of scoring that a checkpoint's `architectures` allow, or None for another head."""
    for name in (config or {}).get("architectures") or ():
        if name.endswith("ForCausalLM"):
            return CAUSAL_LM
        if name.endswith("ForSequenceClassification"):
            return SEQUENCE_CLASSIFICATION
    return None


def label_count(config: dict[str, Any] | None) -> int:
    """Return the number of labels of a sequence classifier's config (transformers' default is 2)."""
    config = config or {}
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


@dataclass(frozen=True)
class Score:
    """How many examples a model got right."""

    correct: int
    examples: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else 0.0


def read_labelled_examples(path: Path, kind: str, *, samples: int | None = None,
                           labels: int | None = None) -> list[tuple[str, Any]]:
    """Read the labelled rows of a JSON Lines file, or of every `*.jsonl` file of a folder in name order.

    Rows are {"prompt", "answer"} strings for a causal LM and {"text", "label"} for a sequence
    classifier, whose label is an integer below `labels` when that is given. With `samples`, only
    the first rows are kept. Raise InputError naming the file and line of the first invalid row.
    """
    path = Path(path)
    text_key, label_key = ROW_KEYS[kind]
    hint = f'write one JSON object per line with a string "{text_key}" and ' + (
        'a string "answer"' if kind == CAUSAL_LM else 'an integer "label"')
    if path.suffix == ".txt" or (path / "dataset_info.json").is_file():
        raise InputError(f"data source {path} is not JSON Lines: labelled rows come from a .jsonl file or a folder "
                         "of them", hint=hint)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    examples: list[tuple[str, Any]] = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"data file {file} cannot be read: {error}", hint=hint) from error
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{file}:{number}: invalid JSON: {error.msg}", hint=hint) from error
            problem = _row_problem(row, kind, labels)
            if problem is not None:
                raise InputError(f"{file}:{number}: {problem}", hint=hint)
            examples.append((row[text_key], row[label_key]))
            if samples is not None and len(examples) == samples:
                return examples
    if not examples:
        raise InputError(f"data source {path} contains no labelled rows", hint=hint)
    return examples


def _row_problem(row: Any, kind: str, labels: int | None) -> str | None:
    text_key, label_key = ROW_KEYS[kind]
    if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
        return f'expected an object with a string "{text_key}"'
    value = row.get(label_key)
    if kind == CAUSAL_LM:
        return None if isinstance(value, str) else 'expected a string "answer"'
    if isinstance(value, bool) or not isinstance(value, int):
        return f'expected an integer "label", got {value!r}'
    if value < 0 or (labels is not None and value >= labels):
        return f"label {value} is not a label of the classifier, which has labels 0 to {labels - 1}"
    return None


def score_examples(network: torch.nn.Module, tokenizer: Any, examples: Sequence[tuple[str, Any]], *, kind: str,
                   batch_size: int = EVAL_BATCH_SIZE, max_length: int | None = None) -> Score:
    """Count the examples that `network` gets right: exact greedy answers, or arg-max labels.

    `max_length` limits the tokens of an input: a prompt keeps its last `max_length` tokens, a
    classifier's text is truncated to its first ones.
    """
    if kind == CAUSAL_LM:
        correct = _count_exact_answers(network, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    elif kind == SEQUENCE_CLASSIFICATION:
        correct = _count_right_labels(network, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    else:
        raise ValueError(f"kind must be one of {tuple(ROW_KEYS)}, got {kind!r}")
    return Score(correct, len(examples))


def _count_exact_answers(network: torch.nn.Module, tokenizer: Any, examples: Sequence[tuple[str, str]], *,
                         batch_size: int, max_length: int | None) -> int:
    # One token past the longest answer shows whether the model ends its answer there.
    longest = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in examples)
    answers = greedy_answers(network, tokenizer, [prompt for prompt, _ in examples], max_new_tokens=longest + 1,
                             batch_size=batch_size, max_length=max_length)
    return sum(got.strip() == expected.strip() for got, (_, expected) in zip(answers, examples))


@torch.no_grad()
def greedy_answers(network: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int = EVAL_BATCH_SIZE, max_length: int | None = None) -> list[str]:
    """Decode greedily after each prompt, up to the end-of-sequence or padding token, and return the texts.

    Prompts with the same number of tokens are batched together, so no padding (and no position-id
    care) is needed. `tokenizer(prompt)` adds the special tokens that the tokenizer adds, such as BOS.
    """
    network.eval()
    device = next(network.parameters()).device
    stop_ids = {token for token in (tokenizer.eos_token_id, tokenizer.pad_token_id) if token is not None}
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    if max_length is not None:
        encoded = [ids[-max_length:] for ids in encoded]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)

    answers = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            rows = indices[start:start + batch_size]
            ids = torch.tensor([encoded[index] for index in rows], device=device)
            finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
            generated = []
            for _ in range(max_new_tokens):
                next_ids = network(input_ids=ids).logits[:, -1].argmax(-1)
                generated.append(next_ids)
                finished |= torch.isin(next_ids, stop_tensor)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                if bool(finished.all()):
                    break
            tokens = torch.stack(generated, dim=1).tolist()
            for row, index in enumerate(rows):
                answer = []
                for token in tokens[row]:
                    if token in stop_ids:
                        break
                    answer.append(token)
                answers[index] = tokenizer.decode(answer, skip_special_tokens=False)
    return answers


@torch.no_grad()
def _count_right_labels(network: torch.nn.Module, tokenizer: Any, examples: Sequence[tuple[str, int]], *,
                        batch_size: int, max_length: int | None) -> int:
    network.eval()
    device = next(network.parameters()).device
    # Texts of similar length share a batch, so that little padding is computed.
    order = sorted(range(len(examples)), key=lambda index: len(examples[index][0]))
    correct = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([examples[index][0] for index in rows], padding=True, truncation=max_length is not None,
                          max_length=max_length, return_tensors="pt").to(device)
        predictions = network(**batch).logits.argmax(dim=-1).tolist()
        correct += sum(prediction == examples[index][1] for prediction, index in zip(predictions, rows))
    return correct


def load_scoring_model(folder: Path, kind: str) -> torch.nn.Module:
    """Load a causal LM or a sequence classifier in float32 from a checkpoint folder, rejecting missing tensors."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    auto_class = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModelForSequenceClassification
    return _load_complete(auto_class, folder).eval()


def format_report(report: dict) -> str:
    """Render the report as a fixed-width table: one row per task and the average."""
    width = max(len("average"), *(len(name) for name in report["tasks"]))
    lines = [f"{report['model']} on the {report['family']} tasks of {report['zoo']}",
             f"{'task':<{width}}  accuracy  normalized  fine-tune   base  examples"]
    for name, row in report["tasks"].items():
        normalized = f"{row['normalized']:.3f}" if row["normalized"] is not None else "-"
        lines.append(f"{name:<{width}}  {row['accuracy']:8.3f}  {normalized:>10}  {row['fine_tune']:9.3f}  "
                     f"{row['base']:5.3f}  {row['examples']:8d}")
    average = report["average"]
    normalized = f"{average['normalized']:.3f}" if average["normalized"] is not None else "-"
    lines.append(f"{'average':<{width}}  {average['accuracy']:8.3f}  {normalized:>10}")
    return "\n".join(lines)
