"""Score a checkpoint on the zoo's tasks: exact-match accuracy, and accuracy normalised by the fine-tunes.

The normalised accuracy of a task is the model's accuracy divided by the accuracy of that task's own
fine-tune, as the model-merging papers report it; 1.0 means the merge kept all of the fine-tune's skill.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from mergekit_plus.errors import InputError
from mergekit_plus.zoo.build import load_manifest


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
    from mergekit_plus.zoo.lm import accuracy

    network = load_causal_lm(model)
    scores = {}
    for name in tasks:
        examples = read_examples(zoo / family["eval_data"][name])
        scores[name] = {"accuracy": accuracy(network, examples), "examples": len(examples)}
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


def read_examples(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["prompt"], row["answer"]) for row in rows]


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
