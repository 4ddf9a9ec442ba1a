"""Merge the model zoo with every shipped method, score each merge, and record the results.

Steps:

1. Build the zoo with `merge zoo build`, which reuses the folder when its settings hash is unchanged.
2. For each recipe `configs/zoo/<family>-<method>[+<variant>].yaml` whose family the zoo has, run
   `merge run RECIPE --force -q`, then `merge eval OUTPUT --zoo DIR --json`. A variant, such as
   `lm-adamerging+task.yaml`, is a second recipe of the same method with other parameters.
3. Score the base and every fine-tune of each family on all of the family's tasks.
4. Write a Markdown section between the markers in the docs page, a bar chart of the average
   normalised accuracy (PNG) and a JSON file with every number.

The recipes name the bench zoo at build/zoo/bench. For any other zoo (`--size test`, or a `--zoo`
elsewhere) each recipe is rewritten. The method and its parameters stay, while `base_model` and
`models` come from the zoo's manifest. The output then goes to a temporary folder that is deleted
at the end. A `data:` entry keeps its kind of file (`calibration.jsonl`, `train.jsonl`, ...) and moves
to that zoo's file of the same task.

Usage: python benchmarks/quality.py [--size bench|test] [--zoo DIR] [--docs FILE] [--png FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "configs" / "zoo"
# The zoo that the recipes in RECIPE_DIR name. Any other zoo gets rewritten recipes.
BENCH_ZOO = Path("build/zoo/bench")
SIZES = ("bench", "test")

SECTION_START = "<!-- merge-quality:start -->"
SECTION_END = "<!-- merge-quality:end -->"
SECTION_HEADING = "## Merge quality on the model zoo"
FINE_TUNES_LABEL = "fine-tunes (each on its own task)"


class BenchmarkError(Exception):
    """A failed step of the benchmark. The message names the step and what to do next."""


# ---------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class RecipeFile:
    """One recipe of RECIPE_DIR, named `<family>-<method>[+<variant>].yaml`, with its parsed YAML."""

    family: str
    method: str
    path: Path
    data: dict[str, Any]
    variant: str = ""

    @property
    def label(self) -> str:
        """The row's name in the tables: the method, and the variant after a `+` when there is one."""
        return f"{self.method}+{self.variant}" if self.variant else self.method


def read_recipes(folder: Path) -> list[RecipeFile]:
    """Read every `<family>-<method>[+<variant>].yaml` in `folder`. Raise BenchmarkError for a name that does not fit."""
    recipes = []
    for path in sorted(folder.glob("*.yaml")):
        family, dash, label = path.stem.partition("-")
        method, _, variant = label.partition("+")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not dash or not isinstance(data, dict):
            raise BenchmarkError(f"{path} is not a recipe named <family>-<method>.yaml; rename or remove it")
        if data.get("merge_method") != method:
            raise BenchmarkError(f"{path} has merge_method {data.get('merge_method')!r}, but the file name gives "
                                 f"{method!r}; make the file name and merge_method agree")
        recipes.append(RecipeFile(family=family, method=method, path=path, data=data, variant=variant))
    return recipes


def task_of(model: str) -> str:
    """Return the task of a fine-tune path such as `build/zoo/bench/lm/ft-sort` (here `sort`)."""
    name = Path(model).name
    if not name.startswith("ft-"):
        raise BenchmarkError(f"model {model!r} is not a zoo fine-tune folder (ft-<task>)")
    return name.removeprefix("ft-")


def _model_entries(recipe: dict[str, Any], source: str) -> list[dict[str, Any]]:
    entries = recipe.get("models")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and "model" in entry for entry in entries):
        raise BenchmarkError(f"{source}: `models` must be a list of `- model: PATH` entries")
    return entries


def _base_path(recipe: dict[str, Any]) -> str | None:
    base = recipe.get("base_model")
    return base.get("model") if isinstance(base, dict) else base


def check_recipe_matches_zoo(recipe: RecipeFile, zoo: Path, family: dict[str, Any]) -> None:
    """Check that a recipe for the bench zoo names exactly that zoo's base and fine-tunes.

    `zoo` is the bench zoo's folder as the recipe's paths spell it, relative to the repository root.
    """
    source = str(recipe.path)
    named = [str(Path(entry["model"])) for entry in _model_entries(recipe.data, source)]
    expected = [str(zoo / path) for path in family["fine_tunes"].values()]
    missing = sorted(set(expected) - set(named))
    extra = sorted(set(named) - set(expected))
    if missing or extra:
        raise BenchmarkError(f"{source} does not list the zoo's fine-tunes (missing: {', '.join(missing) or 'none'}; "
                             f"not in the zoo: {', '.join(extra) or 'none'}); update its `models` to the "
                             f"fine-tunes in {zoo / 'zoo.json'}")
    base = _base_path(recipe.data)
    if base is not None and str(Path(base)) != str(zoo / family["base"]):
        raise BenchmarkError(f"{source} has base_model {base}, but the zoo's base is {zoo / family['base']}; "
                             "update base_model")
    data = recipe.data.get("data") or {}
    for task, entry in data.items():
        expected_path = str(zoo / _zoo_data_file(family, task, Path(entry["path"]).name, source))
        if str(Path(entry["path"])) != expected_path:
            raise BenchmarkError(f"{source}: data for {task!r} is {entry['path']}, but the zoo's file is "
                                 f"{expected_path}; update the `data:` entry")


def _zoo_data_file(family: dict[str, Any], task: str, file_name: str, source: str) -> str:
    """Return the path, relative to the zoo, of `task`'s data file named `file_name` (such as train.jsonl)."""
    kind = Path(file_name).stem
    files = family.get(f"{kind}_data")
    if not isinstance(files, dict):
        raise BenchmarkError(f"{source}: the zoo has no {file_name} files (its manifest has no `{kind}_data`); "
                             "use calibration.jsonl, train.jsonl or eval.jsonl")
    if task not in files:
        raise BenchmarkError(f"{source}: the zoo has no task {task!r} for the `data:` entry; its tasks: "
                             f"{', '.join(files)}")
    return files[task]


def rewrite_recipe(recipe: dict[str, Any], *, zoo: Path, family: dict[str, Any], output: Path,
                   source: str = "recipe") -> dict[str, Any]:
    """Return a copy of `recipe` that merges the fine-tunes of `family` in `zoo` into `output`.

    The method, its parameters and every other setting stay. `base_model` is replaced only when the
    recipe has one, so a recipe without a base (the causal LM linear one) stays without. Each new model entry keeps the per-model
    parameters of the recipe's entry for the same task. A task the recipe does not list takes the
    per-model parameters that all of the recipe's entries share. When those differ, no value is
    right for the new task and BenchmarkError is raised.
    """
    rewritten = copy.deepcopy(recipe)
    entries = _model_entries(recipe, source)
    tokenizer = recipe.get("tokenizer")
    tokenizer_source = tokenizer.get("source") if isinstance(tokenizer, dict) else recipe.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise NotImplementedError(f"{source}: rewriting a recipe whose tokenizer source is a model "
                                  f"({tokenizer_source}) is not supported; use `tokenizer: {{source: base}}`")

    # 1. Per-model parameters by task, and the ones every entry shares (None when they differ).
    by_task = {task_of(entry["model"]): entry.get("parameters") for entry in entries}
    distinct = {json.dumps(parameters, sort_keys=True) for parameters in by_task.values()}
    shared = next(iter(by_task.values())) if len(distinct) == 1 else None

    # 2. One entry per fine-tune of the zoo, in the manifest's task order.
    models = []
    for task, path in family["fine_tunes"].items():
        entry: dict[str, Any] = {"model": str(zoo / path)}
        if task in by_task:
            parameters = by_task[task]
        elif len(distinct) == 1:
            parameters = shared
        else:
            raise BenchmarkError(f"{source}: the zoo has task {task!r}, which the recipe does not list, and the "
                                 "recipe's per-model parameters differ between models, so none of them applies to "
                                 f"{task!r}; give every model the same parameters or list ft-{task}")
        if parameters is not None:
            entry["parameters"] = copy.deepcopy(parameters)
        models.append(entry)
    rewritten["models"] = models

    # 3. The base and the output folder.
    if isinstance(recipe.get("base_model"), dict):
        rewritten["base_model"] = {"model": str(zoo / family["base"])}
    elif recipe.get("base_model") is not None:
        rewritten["base_model"] = str(zoo / family["base"])
    rewritten["output"] = {**(recipe.get("output") or {}), "path": str(output)}

    # 4. Data files: one entry per task of the zoo, each the zoo's file of the kind the recipe names.
    data = recipe.get("data")
    if data:
        kinds = {Path(entry["path"]).name for entry in data.values()}
        settings = [{key: value for key, value in entry.items() if key != "path"} for entry in data.values()]
        if len(kinds) != 1 or any(other != settings[0] for other in settings):
            raise BenchmarkError(f"{source}: the `data:` entries differ in file kind or settings, so none of them "
                                 "applies to the zoo's other tasks; give every task the same kind of file")
        file_name = kinds.pop()
        rewritten["data"] = {task: {"path": str(zoo / _zoo_data_file(family, task, file_name, source)), **settings[0]}
                             for task in family["fine_tunes"]}
    return rewritten


def describe_parameters(recipe: dict[str, Any]) -> str:
    """Render a recipe's global parameters, and any per-model ones, as `name value` pairs."""
    parts = [f"{name} {_format_value(value)}" for name, value in (recipe.get("parameters") or {}).items()]
    per_model = {json.dumps(entry.get("parameters"), sort_keys=True)
                 for entry in recipe.get("models") or [] if isinstance(entry, dict) and entry.get("parameters")}
    if per_model:
        parts.append("per-model parameters: " + "; ".join(sorted(per_model)))
    data = recipe.get("data") or {}
    if data:
        files = sorted({Path(entry["path"]).name for entry in data.values() if isinstance(entry, dict)})
        parts.append(f"data: each task's {', '.join(files)}")
    return ", ".join(parts) if parts else "defaults"


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------------------------------------------
# Scores


@dataclass
class Row:
    """One table row: a model's accuracy per task and its averages."""

    label: str
    accuracy: dict[str, float]
    normalized: dict[str, float | None]
    average_accuracy: float
    average_normalized: float | None
    reference: bool = False


def row_from_report(label: str, report: dict[str, Any], *, reference: bool = False) -> Row:
    """Build a row from a `merge eval --json` report."""
    tasks = report["tasks"]
    return Row(label=label, accuracy={task: scores["accuracy"] for task, scores in tasks.items()},
               normalized={task: scores["normalized"] for task, scores in tasks.items()},
               average_accuracy=report["average"]["accuracy"],
               average_normalized=report["average"]["normalized"], reference=reference)


def fine_tunes_row(reports: dict[str, dict[str, Any]]) -> Row:
    """Build the row that scores each fine-tune on its own task, from reports keyed by the fine-tune's task."""
    accuracy = {task: report["tasks"][task]["accuracy"] for task, report in reports.items()}
    normalized = {task: report["tasks"][task]["normalized"] for task, report in reports.items()}
    return Row(label=FINE_TUNES_LABEL, accuracy=accuracy, normalized=normalized,
               average_accuracy=sum(accuracy.values()) / len(accuracy),
               average_normalized=_mean([value for value in normalized.values() if value is not None]),
               reference=True)


def _mean(values: list[float]) -> float | None:
    # Matches `merge eval`: a task whose fine-tune scores 0 has no normalised accuracy and is skipped.
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------------
# Markdown


@dataclass
class FamilyResult:
    """Everything measured on one zoo family."""

    name: str
    tasks: list[str]
    examples: dict[str, int]
    rows: list[Row]
    parameters: dict[str, str] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunInfo:
    """Provenance of the numbers (command, zoo, timings and machine), for the text around the tables."""

    command: str
    size: str
    zoo: str
    settings_hash: str
    zoo_status: str
    wall_s: float
    merge_s: float
    eval_s: float
    machine: str
    date: str


def render_table(tasks: list[str], rows: list[Row]) -> str:
    """Render rows × (each task's accuracy, average accuracy, average normalised accuracy) as Markdown."""
    header = ["model", *tasks, "average", "average normalised"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row.label, *(f"{row.accuracy[task]:.2f}" for task in tasks), f"{row.average_accuracy:.2f}",
                 "-" if row.average_normalized is None else f"{row.average_normalized:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_section(run: RunInfo, families: list[FamilyResult], chart: str | None) -> str:
    """Render the Markdown that goes between the section markers. `chart` is the PNG's path relative to the page."""
    lines = [
        "<!-- Written by benchmarks/quality.py. A run replaces everything between these markers. -->",
        "",
        "`make bench-quality` builds the model zoo, or reuses it when its settings are unchanged. It then merges",
        "each family's fine-tunes with every recipe in `configs/zoo/` and scores the base, each fine-tune and",
        "each merge with `merge eval` on every task of the family. Accuracy is exact match on the task's",
        "held-out examples. Normalised accuracy divides it by the accuracy of that task's own fine-tune, so",
        "1.000 means that a merge kept all of each fine-tune's skill. The fine-tunes row scores each fine-tune",
        "on its own task only.",
        "",
        f"- Command: `{run.command}`",
        f"- Zoo: size `{run.size}` at `{run.zoo}`, settings hash `{run.settings_hash}` ({run.zoo_status})",
        f"- Wall time: {run.wall_s:.0f} s in all, of which {run.merge_s:.0f} s merging and "
        f"{run.eval_s:.0f} s evaluating",
        f"- Machine: {run.machine}",
        f"- Date: {run.date}",
    ]
    for family in families:
        counts = sorted(set(family.examples.values()))
        examples = f"{counts[0]} held-out examples each" if len(counts) == 1 else (
            f"{counts[0]} to {counts[-1]} held-out examples each")
        lines += ["", f"### {family.name} family: {len(family.tasks)} tasks, {examples}", "",
                  render_table(family.tasks, family.rows)]
        if family.parameters:
            lines += ["", "Method parameters (`configs/zoo/" + family.name + "-<method>[+<variant>].yaml`):", ""]
            lines += [f"- `{method}`: {text}" for method, text in family.parameters.items()]
    if chart is not None:
        lines += ["", f"![Average normalised accuracy of each merge method, per family]({chart})"]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """Put `section` between the markers in `text`, or append a heading and the markers when both are missing.

    Everything outside the markers is kept byte for byte.
    """
    starts, ends = text.count(SECTION_START), text.count(SECTION_END)
    if starts == 0 and ends == 0:
        prefix = text if not text or text.endswith("\n") else text + "\n"
        separator = "\n" if prefix else ""
        return f"{prefix}{separator}{SECTION_HEADING}\n\n{SECTION_START}\n{section}\n{SECTION_END}\n"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if starts != 1 or ends != 1 or end < start:
        raise BenchmarkError(f"the page must contain {SECTION_START} once, followed by {SECTION_END} once "
                             f"(found {starts} and {ends}); fix the markers or remove both")
    return f"{text[:start + len(SECTION_START)]}\n{section}\n{text[end:]}"


# ---------------------------------------------------------------------------------------------------
# Chart


def plot_summary(families: list[FamilyResult], png: Path, *, title: str) -> None:
    """Draw the average normalised accuracy of each row, one panel per family, with the references in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(families), figsize=(max(6.4, 4.8 * len(families)), 4.8), squeeze=False,
                                sharey=True)
    colors = plt.get_cmap("tab10")
    for axis, family in zip(axes[0], families):
        labels = ["fine-tunes" if row.label == FINE_TUNES_LABEL else row.label for row in family.rows]
        heights = [row.average_normalized or 0.0 for row in family.rows]
        method_index = 0
        bar_colors = []
        for row in family.rows:
            if row.reference:
                bar_colors.append("0.75" if row.label == "base" else "0.45")
            else:
                bar_colors.append(colors(method_index))
                method_index += 1
        bars = axis.bar(range(len(labels)), heights, color=bar_colors)
        for bar, row in zip(bars, family.rows):
            text = "n/a" if row.average_normalized is None else f"{row.average_normalized:.3f}"
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                          textcoords="offset points", ha="center", va="bottom", fontsize=8)
        axis.axhline(1.0, color="0.3", linewidth=0.8, linestyle="--")
        axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        axis.set_title(f"{family.name} ({len(family.tasks)} tasks)")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("average normalised accuracy\n(1.0 = each task's fine-tune)")
    top = max([1.0, *(row.average_normalized or 0.0 for family in families for row in family.rows)])
    axes[0][0].set_ylim(0, top * 1.12)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# Running the CLI


def merge_executable() -> Path:
    """Find the `merge` command of the environment that runs this script."""
    candidate = Path(sys.executable).parent / "merge"
    if not candidate.is_file():
        raise BenchmarkError(f"`merge` not found beside {sys.executable}; run `make install` and start this "
                             "script with .venv/bin/python")
    return candidate


def run_command(command: list[str], *, step: str) -> str:
    """Run `command` in the repository root and return its standard output. Raise BenchmarkError when it fails."""
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        stderr = result.stderr.strip() or "(no output on stderr)"
        raise BenchmarkError(f"{step} failed with exit status {result.returncode}\n"
                             f"command: {shlex.join(command)}\nstderr:\n{stderr}")
    return result.stdout


def evaluate(merge: Path, model: Path, zoo: Path) -> dict[str, Any]:
    """Score `model` on every task of its family with `merge eval --json`."""
    command = [str(merge), "eval", str(model), "--zoo", str(zoo), "--json"]
    stdout = run_command(command, step=f"evaluating {model}")
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"`{shlex.join(command)}` printed no valid JSON ({error}); its output began "
                             f"with:\n{stdout[:500]}") from error


def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def describe_machine() -> str:
    """Describe the CPU, memory, OS and library versions, and the thread setting when one is set."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 2**20:.1f} GiB of memory"
                break
    versions = []
    for package in ("torch", "transformers"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    cores = f"{os.cpu_count()} cores" + (f" ({model})" if model else "")
    threads = os.environ.get("OMP_NUM_THREADS")
    thread_note = f", OMP_NUM_THREADS={threads}" if threads else ""
    return (f"{cores}{memory}, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"{', '.join(versions)}{thread_note}")


# ---------------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="bench",
                        help="zoo size to build or reuse (default: bench; test has only the lm family)")
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: build/zoo/SIZE)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for building the zoo, passed to `merge zoo build --threads`. The zoo's "
                             "settings hash includes it (default: that command's default)")
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"),
                        help="Markdown page that receives the results section (default: docs/benchmarks.md)")
    parser.add_argument("--png", type=Path, default=Path("docs/images/merge-quality.png"),
                        help="bar chart to write (default: docs/images/merge-quality.png)")
    parser.add_argument("--json", type=Path, default=None,
                        help="file for every number of the run (default: build/merge-quality-SIZE.json)")
    return parser.parse_args(argv)


def build_or_reuse_zoo(merge: Path, size: str, zoo: Path, threads: int | None) -> tuple[dict[str, Any], str, float]:
    """Run `merge zoo build`. Return the manifest, a note saying whether the zoo was reused or built, and the
    seconds taken."""
    manifest_path = zoo / "zoo.json"
    previous = None
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("settings_hash")
    command = [str(merge), "zoo", "build", "--size", size, "--out", str(zoo), "--quiet"]
    if threads is not None:
        command += ["--threads", str(threads)]
    _, seconds = _timed(lambda: run_command(command, step=f"building the {size} zoo"))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    # `merge zoo build` rebuilds only when the settings hash changed, so an equal hash means a reuse.
    status = "reused" if previous == manifest["settings_hash"] else f"built in {seconds:.0f} s"
    return manifest, status, seconds


def plan_recipes(recipes: list[RecipeFile], manifest: dict[str, Any], zoo: Path, work: Path | None,
                 method_order: list[str]) -> dict[str, list[tuple[RecipeFile, Path]]]:
    """Choose, per family, the recipe file to run and its output folder, rewriting recipes for a non-bench zoo.

    `work` is None for the bench zoo, whose recipes run unchanged. Every recipe is checked or
    rewritten here, so a stale recipe fails before the first merge.
    """
    planned: dict[str, list[tuple[RecipeFile, Path]]] = {}
    rank = {name: index for index, name in enumerate(method_order)}
    for recipe in sorted(recipes, key=lambda item: (rank.get(item.method, len(rank)), item.label)):
        family = manifest["families"].get(recipe.family)
        if family is None:
            print(f"skip {recipe.path.name}: the zoo has no {recipe.family} family", flush=True)
            continue
        name = f"{recipe.family}-{recipe.label}"
        if work is None:
            check_recipe_matches_zoo(recipe, BENCH_ZOO, family)
            output = REPO_ROOT / (recipe.data.get("output") or {}).get("path", f"build/merged/zoo/{name}")
            planned.setdefault(recipe.family, []).append((recipe, output))
            continue
        output = work / "merged" / name
        data = rewrite_recipe(recipe.data, zoo=zoo, family=family, output=output, source=str(recipe.path))
        path = work / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        planned.setdefault(recipe.family, []).append(
            (RecipeFile(recipe.family, recipe.method, path, data, recipe.variant), output))
    return planned


def measure_family(merge: Path, zoo: Path, name: str, family: dict[str, Any],
                   recipes: list[tuple[RecipeFile, Path]], timings: dict[str, float]) -> FamilyResult:
    """Score the base, every fine-tune and every merge of one family, and add each step's seconds to `timings`."""
    tasks = list(family["tasks"])

    # 1. The references: the base and each fine-tune, on every task of the family.
    base, seconds = _timed(lambda: evaluate(merge, zoo / family["base"], zoo))
    timings[f"eval {name} base"] = seconds
    print(f"eval {name} base: average accuracy {base['average']['accuracy']:.2f} ({seconds:.1f} s)", flush=True)
    fine_tunes = {}
    for task, path in family["fine_tunes"].items():
        fine_tunes[task], seconds = _timed(lambda path=path: evaluate(merge, zoo / path, zoo))
        timings[f"eval {name} ft-{task}"] = seconds
        own = fine_tunes[task]["tasks"][task]["accuracy"]
        print(f"eval {name} ft-{task}: {own:.2f} on its own task ({seconds:.1f} s)", flush=True)
    rows = [row_from_report("base", base, reference=True), fine_tunes_row(fine_tunes)]

    # 2. The merges.
    merges, parameters, recipes_run = {}, {}, {}
    for recipe, output in recipes:
        label = f"{name}-{recipe.label}"
        command = [str(merge), "run", str(recipe.path), "--force", "-q"]
        _, seconds = _timed(lambda command=command: run_command(command, step=f"merging {label}"))
        timings[f"merge {label}"] = seconds
        print(f"merge {label} ({seconds:.1f} s)", flush=True)
        report, seconds = _timed(lambda output=output: evaluate(merge, output, zoo))
        timings[f"eval {label}"] = seconds
        normalized = report["average"]["normalized"]
        print(f"eval {label}: average accuracy {report['average']['accuracy']:.2f}, normalised "
              f"{'-' if normalized is None else f'{normalized:.3f}'} ({seconds:.1f} s)", flush=True)
        merges[recipe.label] = report
        parameters[recipe.label] = describe_parameters(recipe.data)
        recipes_run[recipe.label] = {"file": str(recipe.path), "recipe": recipe.data}
        rows.append(row_from_report(recipe.label, report))

    examples = {task: scores["examples"] for task, scores in base["tasks"].items()}
    return FamilyResult(name=name, tasks=tasks, examples=examples, rows=rows, parameters=parameters,
                        reports={"base": base, "fine_tunes": fine_tunes, "merges": merges}, recipes=recipes_run)


def choose_zoo(size: str, zoo: Path | None) -> Path:
    """Return the zoo folder: `zoo` when given, else build/zoo/SIZE. Reject a non-bench size at the bench zoo's folder."""
    folder = zoo if zoo is not None else REPO_ROOT / "build" / "zoo" / size
    if size != "bench" and folder.resolve() == (REPO_ROOT / BENCH_ZOO).resolve():
        raise BenchmarkError(f"{BENCH_ZOO} is the bench zoo that configs/zoo names, so the {size} zoo cannot be "
                             "built there; pass --size bench or another --zoo")
    return folder


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    docs, png = _absolute(args.docs), _absolute(args.png)
    json_path = _absolute(args.json) if args.json is not None else REPO_ROOT / "build" / f"merge-quality-{args.size}.json"
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        # 1. Everything that can fail without a merge: the tools, the recipes and the docs page's markers.
        zoo = choose_zoo(args.size, _absolute(args.zoo) if args.zoo is not None else None)
        merge = merge_executable()
        if importlib.util.find_spec("matplotlib") is None:
            raise BenchmarkError("matplotlib is not installed; install it with `.venv/bin/pip install matplotlib`")
        recipes = read_recipes(RECIPE_DIR)
        page = docs.read_text(encoding="utf-8") if docs.is_file() else ""
        replace_section(page, "")
        from mergekit_plus.methods import list_methods

        method_order = [method.name for method in list_methods()]

        # 2. The zoo.
        manifest, zoo_status, seconds = build_or_reuse_zoo(merge, args.size, zoo, args.threads)
        print(f"zoo {_display_path(zoo)}: settings {manifest['settings_hash']}, {zoo_status} ({seconds:.1f} s)",
              flush=True)

        # 3. Recipes, checked or rewritten before the first merge, then the scores of every family.
        is_bench_zoo = zoo.resolve() == (REPO_ROOT / BENCH_ZOO).resolve()
        timings: dict[str, float] = {"zoo": seconds}
        with tempfile.TemporaryDirectory(prefix="merge-quality-") as scratch:
            work = None if is_bench_zoo else Path(scratch)
            planned = plan_recipes(recipes, manifest, zoo, work, method_order)
            families = [measure_family(merge, zoo, name, family, planned.get(name, []), timings)
                        for name, family in manifest["families"].items()]
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    wall_s = time.perf_counter() - started

    # 4. The Markdown section, the chart and the JSON file.
    run = RunInfo(command=command, size=manifest["size"], zoo=_display_path(zoo),
                  settings_hash=manifest["settings_hash"], zoo_status=zoo_status, wall_s=wall_s,
                  merge_s=sum(value for key, value in timings.items() if key.startswith("merge ")),
                  eval_s=sum(value for key, value in timings.items() if key.startswith("eval ")),
                  machine=describe_machine(), date=datetime.date.today().isoformat())
    plot_summary(families, png, title=f"Merge quality on the {run.size} zoo (settings {run.settings_hash})")
    chart = Path(os.path.relpath(png, docs.parent)).as_posix()
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(replace_section(page, render_section(run, families, chart)), encoding="utf-8")
    record = {"run": asdict(run), "timings_s": timings,
              "families": {family.name: asdict(family) for family in families}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {_display_path(docs)}, {_display_path(png)} and {_display_path(json_path)} "
          f"({wall_s:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
