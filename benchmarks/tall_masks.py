"""Measure how much of each fine-tune's accuracy the TALL-mask reconstructions keep on the zoo's LM family.

For every setting (a λ grid and an `inner`), the script:

1. writes a `tall_masks` recipe over the family's fine-tunes with `mask_lambda: auto`, whose
   `data:` names each task's validation rows (`train.jsonl`), and runs it;
2. rebuilds each task from the bundle (as `merge extract` does) and scores it on the task's
   held-out `eval.jsonl` (as `merge eval` does), normalised by the fine-tune's accuracy;
3. with `--oracle`, also scores every λ of the grid on `eval.jsonl` itself, the best that the
   grid allows when λ_t is chosen on the test data.

It prints Markdown tables and writes every number to a JSON file.

The zoo is only read. A zoo built before the labelled train split existed has no
`data/TASK/train.jsonl`. For such a zoo the script draws the split that `merge zoo build` would
write, with the zoo's own settings, into WORK/validation/TASK/train.jsonl. It first checks that
those settings draw the zoo's `eval.jsonl` exactly.

Usage: python benchmarks/tall_masks.py [--zoo build/zoo/bench] [--work build/tall_masks_bench]
       [--grid paper] [--grid fine] [--inner task_arithmetic] [--inner ties] [--oracle] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GRIDS = {
    "paper": "0.2, 0.3, 0.4, 0.5, 0.6",
    "fine": ", ".join(f"{value / 100:g}" for value in range(10, 101, 5)),
}
"""λ grids by name: the TALL paper's {0.2, …, 0.6}, and 0.1 to 1.0 in steps of 0.05."""
INNERS = ("task_arithmetic", "ties")
TARGET = 0.99


class BenchmarkError(Exception):
    """A failed step of the benchmark. The message names the step and what to do next."""


@dataclass(frozen=True)
class Setting:
    grid: str
    inner: str
    density: float | None = None
    """The TIES trim density with `inner: ties`. None keeps the method's default 0.2, the TALL paper's k = 20 %."""

    @property
    def name(self) -> str:
        inner = self.inner if self.density is None else f"{self.inner} (density {self.density:g})"
        return f"{inner}, {self.grid} grid"

    @property
    def slug(self) -> str:
        density = "" if self.density is None else f"-density{self.density:g}"
        return f"{self.inner}{density}-{self.grid}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("build/zoo/bench"), help="The zoo folder (read only).")
    parser.add_argument("--work", type=Path, default=Path("build/tall_masks_bench"),
                        help="Folder for recipes, bundles, rebuilt tasks and the results JSON.")
    parser.add_argument("--grid", action="append", choices=sorted(GRIDS),
                        help="λ grid to search; repeat for several. Default: paper and fine.")
    parser.add_argument("--inner", action="append", choices=INNERS,
                        help="How τ_MTL is made; repeat for several. Default: both.")
    parser.add_argument("--ties-density", action="append", type=float, metavar="D",
                        help="With `--inner ties`: a TIES trim density to run instead of the paper's 0.2; repeat "
                             "for several.")
    parser.add_argument("--oracle", action="store_true",
                        help="Also score every λ of each grid on the evaluation rows themselves.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    torch.set_num_threads(args.threads)
    densities: list[float | None] = list(args.ties_density or [None])
    settings = [Setting(grid, inner, density if inner == "ties" else None)
                for inner in (args.inner or INNERS) for density in (densities if inner == "ties" else [None])
                for grid in (args.grid or ("paper", "fine"))]
    try:
        results = run(args.zoo, args.work, settings, oracle=args.oracle)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    results["threads"] = args.threads
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(format_tables(results))
    print(f"\nnumbers: {args.work / 'results.json'}")
    return 0


def run(zoo: Path, work: Path, settings: list[Setting], *, oracle: bool) -> dict[str, Any]:
    """Run every setting on the zoo's LM family and return the numbers."""
    manifest = _load_zoo(zoo)
    family = manifest["families"]["lm"]
    tasks = list(family["tasks"])
    validation = validation_files(zoo, manifest, work / "validation")
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"zoo": str(zoo), "settings_hash": manifest.get("settings_hash"), "tasks": tasks,
                               "fine_tunes": family["accuracy"]["fine_tunes"], "runs": []}
    for setting in settings:
        started = time.perf_counter()
        bundle = work / f"bundle-{setting.slug}"
        run_recipe(write_recipe(zoo, family, setting, validation, bundle, work / f"{setting.slug}.yaml"))
        chosen = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))["tasks"]
        row: dict[str, Any] = {"setting": setting.name, "grid": setting.grid, "lambda_grid": GRIDS[setting.grid],
                               "inner": setting.inner, "density": setting.density, "tasks": {}}
        for task, record in zip(tasks, chosen):
            report = score_task(bundle, record["name"], zoo, task, work / "rebuilt" / setting.slug)
            row["tasks"][task] = {"mask_lambda": record["mask_lambda"],
                                  "validation_accuracy": _chosen_accuracy(record["lambda_selection"]),
                                  "accuracy": report["accuracy"], "normalized": report["normalized"]}
        if oracle:
            evaluation = {task: zoo / family["eval_data"][task] for task in tasks}
            oracle_bundle = work / f"oracle-{setting.slug}"
            run_recipe(write_recipe(zoo, family, setting, evaluation, oracle_bundle, work / f"oracle-{setting.slug}.yaml"))
            records = json.loads((oracle_bundle / "bundle.json").read_text(encoding="utf-8"))["tasks"]
            row["oracle"] = {task: record["lambda_selection"]["scores"] for task, record in zip(tasks, records)}
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["runs"].append(row)
    return results


def _load_zoo(zoo: Path) -> dict[str, Any]:
    path = zoo / "zoo.json"
    if not path.is_file():
        raise BenchmarkError(f"no zoo at {zoo} ({path} not found); build it with `merge zoo build --size bench`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if "lm" not in manifest.get("families", {}):
        raise BenchmarkError(f"the zoo at {zoo} has no causal-LM family")
    return manifest


def validation_files(zoo: Path, manifest: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Return each task's labelled validation file: the zoo's train split, or the same split drawn into `folder`."""
    family = manifest["families"]["lm"]
    if "train_data" in family:
        return {task: zoo / path for task, path in family["train_data"].items()}

    from dataclasses import fields, replace

    from mergekit_plus.zoo.build import LM_SIZES
    from mergekit_plus.zoo.lm import held_out_splits, train_split

    # The zoo's recorded settings, with the train split's size from this version (older zoos lack it).
    size = manifest["size"]
    recorded = manifest["settings"]["lm"]
    known = {field.name for field in fields(LM_SIZES[size])}
    settings = replace(LM_SIZES[size], **{key: tuple(value) if isinstance(value, list) else value
                                          for key, value in recorded.items() if key in known})
    splits = held_out_splits(settings)
    held_out = {prompt for split in splits.values() for rows in split.values() for prompt, _ in rows}
    files = {}
    for task in settings.tasks:
        expected = [{"prompt": prompt, "answer": answer} for prompt, answer in splits[task]["eval"]]
        stored = [json.loads(line) for line in (zoo / family["eval_data"][task]).read_text().splitlines() if line]
        if stored != expected:
            raise BenchmarkError(f"the zoo's {task} eval.jsonl differs from the split that its recorded settings draw, "
                                 "so its train split cannot be drawn again; rebuild it with `merge zoo build`")
        rows = [{"prompt": prompt, "answer": answer} for prompt, answer in train_split(settings, task, held_out)]
        path = folder / task / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        files[task] = path
    return files


def write_recipe(zoo: Path, family: dict[str, Any], setting: Setting, data: dict[str, Path], output: Path,
                 path: Path) -> Path:
    """Write the `tall_masks` recipe of one setting, with `mask_lambda: auto` for every task."""
    recipe = {
        "merge_method": "tall_masks",
        "base_model": str(zoo / family["base"]),
        "models": [{"model": str(zoo / family["fine_tunes"][task])} for task in family["tasks"]],
        "parameters": {"mask_lambda": "auto", "lambda_grid": GRIDS[setting.grid], "inner": setting.inner,
                       **({} if setting.density is None else {"density": setting.density})},
        "data": {task: {"path": str(data[task]), "batch_size": 256} for task in family["tasks"]},
        "dtype": "float32",
        "output": {"path": str(output), "overwrite": True},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_recipe(path: Path) -> None:
    from mergekit_plus.errors import MergeError
    from mergekit_plus.execute import run_plan
    from mergekit_plus.plan import build_plan
    from mergekit_plus.recipe.validate import load_recipe

    try:
        plan = build_plan(load_recipe(path), overwrite=True)
        run_plan(plan, recipe_data=yaml.safe_load(path.read_text(encoding="utf-8")), progress=False)
    except MergeError as error:
        raise BenchmarkError(f"merge run {path} failed: {error}") from error


def score_task(bundle: Path, name: str, zoo: Path, task: str, folder: Path) -> dict[str, Any]:
    """Rebuild one task from the bundle and score it on the zoo's evaluation rows of that task."""
    from mergekit_plus.io.bundle import extract_task
    from mergekit_plus.zoo.evaluate import evaluate

    rebuilt = extract_task(bundle, name, folder / name, overwrite=True)
    return evaluate(rebuilt, zoo, [task])["tasks"][task]


def _chosen_accuracy(selection: dict[str, Any]) -> float:
    return next(item["accuracy"] for item in selection["scores"] if item["mask_lambda"] == selection["mask_lambda"])


def format_tables(results: dict[str, Any]) -> str:
    """Render the results as Markdown: normalised accuracy and λ_t per task, and the oracle grids."""
    tasks = results["tasks"]
    lines = ["| setting | " + " | ".join(tasks) + " | mean | tasks ≥ 0.99 |",
             "|---|" + "---:|" * (len(tasks) + 2)]
    for run in results["runs"]:
        cells = []
        values = []
        for task in tasks:
            row = run["tasks"][task]
            values.append(row["normalized"])
            cells.append(f"{row['normalized']:.4f} (λ {row['mask_lambda']})")
        passed = sum(value >= TARGET for value in values)
        lines.append(f"| {run['setting']} | " + " | ".join(cells)
                     + f" | {sum(values) / len(values):.3f} | {passed} of {len(values)} |")
    lines.append("")
    lines.append("Normalised accuracy on eval.jsonl (reconstruction ÷ fine-tune), with λ_t chosen on train.jsonl.")
    for run in results["runs"]:
        if "oracle" not in run:
            continue
        fine_tunes = results["fine_tunes"]
        grid = [item["mask_lambda"] for item in run["oracle"][tasks[0]]]
        lines += ["", f"Every λ scored on eval.jsonl itself ({run['setting']}), normalised:", "",
                  "| λ | " + " | ".join(tasks) + " |", "|---:|" + "---:|" * len(tasks)]
        for index, value in enumerate(grid):
            cells = [f"{run['oracle'][task][index]['accuracy'] / fine_tunes[task]:.3f}" for task in tasks]
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
        best = [max(item["accuracy"] for item in run["oracle"][task]) / fine_tunes[task] for task in tasks]
        lines.append("| best | " + " | ".join(f"{value:.3f}" for value in best) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
