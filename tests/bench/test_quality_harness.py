"""The pure parts of benchmarks/quality.py: recipes, rewriting for another zoo, tables and the docs section.

Nothing here trains, merges or evaluates a model. The recipes are checked against the bench zoo's
settings, so a change to the zoo's tasks fails here instead of after a 20-minute zoo build.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from mergekit_plus.methods import list_methods
from mergekit_plus.recipe.validate import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_harness():
    spec = importlib.util.spec_from_file_location("quality_harness", REPO_ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while the class bodies run.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load_harness()

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "consensus", "lines", "pcb")
# Recipes beyond METHODS, by their label (`<method>[+<variant>]`). AdaMerging has one recipe per family.
LM_ONLY = ("adamerging", "adamerging+task")
ENCODER_ONLY = ("adamerging", "adamerging+task")
# The settings the recipes must carry: the usual ones of each method's paper.
EXPECTED_PARAMETERS = {
    "linear": {"weight": 1.0, "normalize": True},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0, "normalize": True, "sign_election": "trimmed", "scope": "model"},
    "dare_linear": {"density": 0.5, "lambda": 0.3, "rescale": True},
    "dare_ties": {"density": 0.5, "lambda": 1.0, "normalize": True, "rescale": True, "sign_election": "trimmed"},
    "consensus": {"inner": "task_arithmetic", "k": 2, "mask_lambda": 0.4, "lambda": 0.4},
    "lines": {"inner": "task_arithmetic", "beta": 0.3},
    "pcb": {"variant": "reference", "density": 0.2, "clamp_ratio": 0.01, "lambda": 1.0, "scope": "model"},
    "adamerging": {"granularity": "layer", "steps": 500, "lr": 0.001, "init": 0.3, "clamp": True,
                   "positions": "answer"},
    "adamerging+task": {"granularity": "task", "steps": 500, "lr": 0.001, "init": 0.3, "clamp": True,
                        "positions": "answer"},
}
# A classifier's entropy is that of its head's labels, so the encoder recipes have no answer `positions`.
ENCODER_PARAMETERS = {
    "adamerging": {"granularity": "layer", "steps": 500, "lr": 0.001, "init": 0.3, "clamp": True},
    "adamerging+task": {"granularity": "task", "steps": 500, "lr": 0.001, "init": 0.3, "clamp": True},
}


def _family(tasks: list[str], prefix: str = "lm") -> dict:
    family = {"tasks": tasks, "base": f"{prefix}/base", "fine_tunes": {task: f"{prefix}/ft-{task}" for task in tasks}}
    for kind in ("eval", "calibration", "train"):
        family[f"{kind}_data"] = {task: f"{prefix}/data/{task}/{kind}.jsonl" for task in tasks}
    return family


def _report(accuracy: dict[str, float], fine_tune: dict[str, float]) -> dict:
    tasks = {task: {"accuracy": value, "normalized": value / fine_tune[task] if fine_tune[task] else None,
                    "fine_tune": fine_tune[task], "base": 0.0, "examples": 100}
             for task, value in accuracy.items()}
    normalized = [row["normalized"] for row in tasks.values() if row["normalized"] is not None]
    return {"tasks": tasks, "average": {"accuracy": sum(accuracy.values()) / len(accuracy),
                                        "normalized": sum(normalized) / len(normalized) if normalized else None}}


# ---------------------------------------------------------------------------------------------------
# The recipes in configs/zoo


def test_recipes_one_per_family_and_method():
    recipes = quality.read_recipes(quality.RECIPE_DIR)
    expected = [(family, method) for family in ("lm", "encoder") for method in METHODS]
    expected += [("lm", label) for label in LM_ONLY]
    expected += [("encoder", label) for label in ENCODER_ONLY]
    assert sorted((recipe.family, recipe.label) for recipe in recipes) == sorted(expected)
    assert set(METHODS) | {label.partition("+")[0] for label in LM_ONLY} <= {method.name for method in list_methods()}


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs" / "zoo").glob("*.yaml")), ids=lambda path: path.stem)
def test_recipe_valid_and_names_bench_zoo(path, monkeypatch):
    # The data files of the AdaMerging recipes exist only once the bench zoo is built, which the test
    # suite does not do, so only the schema and the paths are checked here.
    monkeypatch.setattr("mergekit_plus.recipe.validate.check_data_source", lambda path: None)
    load_recipe(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    family, _, label = path.stem.partition("-")
    assert data["merge_method"] == label.partition("+")[0]
    expected = ENCODER_PARAMETERS.get(label) if family == "encoder" else None
    assert data["parameters"] == (expected or EXPECTED_PARAMETERS[label])
    assert data["seed"] == 0
    assert data["output"] == {"path": f"build/merged/zoo/{family}-{label}"}
    assert all(entry["model"].startswith(f"build/zoo/bench/{family}/ft-") for entry in data["models"])
    assert all("parameters" not in entry for entry in data["models"])
    if label == "linear" and family == "lm":
        assert "base_model" not in data
    else:
        assert data["base_model"] == f"build/zoo/bench/{family}/base"


def test_recipes_list_every_bench_task():
    from mergekit_plus.zoo.build import settings_for

    settings = settings_for("bench")
    bench_tasks = {"lm": list(settings.lm.tasks), "encoder": list(settings.encoder.tasks)}
    for recipe in quality.read_recipes(quality.RECIPE_DIR):
        family = _family(bench_tasks[recipe.family], prefix=recipe.family)
        quality.check_recipe_matches_zoo(recipe, quality.BENCH_ZOO, family)


def test_read_recipes_rejects_mismatched_name(tmp_path):
    (tmp_path / "lm-ties.yaml").write_text("merge_method: linear\nmodels: []\n", encoding="utf-8")
    with pytest.raises(quality.BenchmarkError, match="merge_method 'linear', but the file name gives 'ties'"):
        quality.read_recipes(tmp_path)


def test_read_recipes_rejects_name_without_family(tmp_path):
    (tmp_path / "ties.yaml").write_text("merge_method: ties\nmodels: []\n", encoding="utf-8")
    with pytest.raises(quality.BenchmarkError, match="not a recipe named <family>-<method>.yaml"):
        quality.read_recipes(tmp_path)


def test_check_recipe_reports_missing_task():
    recipe = quality.RecipeFile("lm", "ties", Path("lm-ties.yaml"), {
        "merge_method": "ties", "base_model": "build/zoo/bench/lm/base",
        "models": [{"model": "build/zoo/bench/lm/ft-sort"}]})
    family = _family(["sort", "add"])
    with pytest.raises(quality.BenchmarkError, match=r"missing: build/zoo/bench/lm/ft-add; not in the zoo: none"):
        quality.check_recipe_matches_zoo(recipe, quality.BENCH_ZOO, family)


def test_check_recipe_reports_wrong_base():
    recipe = quality.RecipeFile("lm", "ties", Path("lm-ties.yaml"), {
        "merge_method": "ties", "base_model": "build/zoo/test/lm/base",
        "models": [{"model": "build/zoo/bench/lm/ft-sort"}]})
    with pytest.raises(quality.BenchmarkError, match="the zoo's base is build/zoo/bench/lm/base"):
        quality.check_recipe_matches_zoo(recipe, quality.BENCH_ZOO, _family(["sort"]))


# ---------------------------------------------------------------------------------------------------
# Rewriting a recipe for another zoo


def test_rewrite_recipe_takes_zoo_inputs(tmp_path):
    recipe = yaml.safe_load((quality.RECIPE_DIR / "lm-ties.yaml").read_text(encoding="utf-8"))
    original = copy.deepcopy(recipe)
    family = _family(["sort", "vowels"])

    rewritten = quality.rewrite_recipe(recipe, zoo=tmp_path / "zoo", family=family, output=tmp_path / "out")

    assert rewritten["base_model"] == str(tmp_path / "zoo" / "lm" / "base")
    assert rewritten["models"] == [{"model": str(tmp_path / "zoo" / "lm" / "ft-sort")},
                                   {"model": str(tmp_path / "zoo" / "lm" / "ft-vowels")}]
    assert rewritten["output"] == {"path": str(tmp_path / "out")}
    assert rewritten["merge_method"] == "ties"
    assert rewritten["parameters"] == original["parameters"]
    assert rewritten["seed"] == original["seed"]
    assert recipe == original


def test_rewrite_recipe_keeps_linear_without_base(tmp_path):
    recipe = yaml.safe_load((quality.RECIPE_DIR / "lm-linear.yaml").read_text(encoding="utf-8"))
    rewritten = quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort"]), output=tmp_path / "out")
    assert "base_model" not in rewritten
    assert rewritten["parameters"] == {"weight": 1.0, "normalize": True}


def test_rewrite_recipe_keeps_base_mapping_form(tmp_path):
    recipe = {"merge_method": "ties", "base_model": {"model": "old/base", "revision": "v1"},
              "models": [{"model": "old/ft-sort"}], "output": {"path": "old-out", "shard_size": "1MB"}}
    rewritten = quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort"]), output=tmp_path / "out")
    assert rewritten["base_model"] == {"model": str(tmp_path / "lm" / "base")}
    assert rewritten["output"] == {"path": str(tmp_path / "out"), "shard_size": "1MB"}


def test_rewrite_recipe_per_model_parameters_by_task(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "old/base",
              "models": [{"model": "old/ft-sort", "parameters": {"weight": 2.0}},
                         {"model": "old/ft-add", "parameters": {"weight": 0.5}}]}
    rewritten = quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["add", "sort"]), output=tmp_path)
    assert [entry["parameters"] for entry in rewritten["models"]] == [{"weight": 0.5}, {"weight": 2.0}]


def test_rewrite_recipe_shared_parameters_for_new_task(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "old/base",
              "models": [{"model": "old/ft-sort", "parameters": {"density": 0.3}},
                         {"model": "old/ft-add", "parameters": {"density": 0.3}}]}
    rewritten = quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort", "vowels"]), output=tmp_path)
    assert [entry["parameters"] for entry in rewritten["models"]] == [{"density": 0.3}, {"density": 0.3}]


def test_rewrite_recipe_rejects_new_task_when_parameters_differ(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "old/base",
              "models": [{"model": "old/ft-sort", "parameters": {"weight": 2.0}},
                         {"model": "old/ft-add", "parameters": {"weight": 0.5}}]}
    with pytest.raises(quality.BenchmarkError, match="the zoo has task 'vowels', which the recipe does not list"):
        quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort", "vowels"]), output=tmp_path)


def test_rewrite_recipe_rejects_model_tokenizer_source(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "old/base", "models": [{"model": "old/ft-sort"}],
              "tokenizer": {"source": "old/ft-sort"}}
    with pytest.raises(NotImplementedError, match="tokenizer source is a model"):
        quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort"]), output=tmp_path)


def test_rewrite_recipe_rejects_non_fine_tune_model(tmp_path):
    recipe = {"merge_method": "ties", "base_model": "old/base", "models": [{"model": "old/moe"}]}
    with pytest.raises(quality.BenchmarkError, match="is not a zoo fine-tune folder"):
        quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort"]), output=tmp_path)


def test_plan_recipes_writes_valid_rewrites(tmp_path):
    recipes = quality.read_recipes(quality.RECIPE_DIR)
    manifest = {"families": {"lm": _family(["sort", "vowels"])}}
    for task in ("sort", "vowels"):
        # `load_recipe` checks that the data files of the AdaMerging recipes exist.
        data = tmp_path / "zoo" / "lm" / "data" / task / "calibration.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text('{"prompt": "Sabc>"}\n', encoding="utf-8")
    planned = quality.plan_recipes(recipes, manifest, tmp_path / "zoo", tmp_path / "work", list(METHODS))

    assert list(planned) == ["lm"]
    assert [recipe.label for recipe, _ in planned["lm"]] == [*METHODS, *LM_ONLY]
    for recipe, output in planned["lm"]:
        assert recipe.path == tmp_path / "work" / "recipes" / f"lm-{recipe.label}.yaml"
        assert output == tmp_path / "work" / "merged" / f"lm-{recipe.label}"
        loaded = load_recipe(recipe.path)
        assert [model.model for model in loaded.models] == [
            str(tmp_path / "zoo" / "lm" / "ft-sort"), str(tmp_path / "zoo" / "lm" / "ft-vowels")]


def test_rewrite_recipe_moves_data_to_zoo(tmp_path):
    recipe = yaml.safe_load((quality.RECIPE_DIR / "lm-adamerging.yaml").read_text(encoding="utf-8"))
    rewritten = quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort", "add"]), output=tmp_path)

    assert rewritten["data"] == {
        "sort": {"path": str(tmp_path / "lm" / "data" / "sort" / "calibration.jsonl"), "batch_size": 16},
        "add": {"path": str(tmp_path / "lm" / "data" / "add" / "calibration.jsonl"), "batch_size": 16}}


def test_rewrite_recipe_rejects_mixed_data_kinds(tmp_path):
    recipe = {"merge_method": "adamerging", "base_model": "old/base", "models": [{"model": "old/ft-sort"}],
              "data": {"sort": {"path": "old/data/sort/train.jsonl"}, "add": {"path": "old/data/add/eval.jsonl"}}}
    with pytest.raises(quality.BenchmarkError, match="differ in file kind or settings"):
        quality.rewrite_recipe(recipe, zoo=tmp_path, family=_family(["sort"]), output=tmp_path)


def test_check_recipe_reports_wrong_data_file():
    recipe = quality.RecipeFile("lm", "adamerging", Path("lm-adamerging.yaml"), {
        "merge_method": "adamerging", "base_model": "build/zoo/bench/lm/base",
        "models": [{"model": "build/zoo/bench/lm/ft-sort"}],
        "data": {"sort": {"path": "build/zoo/test/lm/data/sort/calibration.jsonl"}}})
    with pytest.raises(quality.BenchmarkError, match="the zoo's file is build/zoo/bench/lm/data/sort/calibration.jsonl"):
        quality.check_recipe_matches_zoo(recipe, quality.BENCH_ZOO, _family(["sort"]))


def test_read_recipes_takes_variant(tmp_path):
    (tmp_path / "lm-ties+dense.yaml").write_text("merge_method: ties\nmodels: []\n", encoding="utf-8")
    [recipe] = quality.read_recipes(tmp_path)
    assert recipe.method == "ties"
    assert recipe.label == "ties+dense"


# ---------------------------------------------------------------------------------------------------
# Rows, tables and the docs section


def test_fine_tunes_row_uses_own_task():
    fine_tune = {"sort": 0.8, "add": 0.0}
    reports = {"sort": _report({"sort": 0.8, "add": 0.1}, fine_tune),
               "add": _report({"sort": 0.3, "add": 0.0}, fine_tune)}
    row = quality.fine_tunes_row(reports)
    assert row.accuracy == {"sort": 0.8, "add": 0.0}
    assert row.average_accuracy == pytest.approx(0.4)
    # `add` has no normalised accuracy because its fine-tune scores 0, so it is left out of the average.
    assert row.average_normalized == pytest.approx(1.0)
    assert row.reference


def test_render_table():
    fine_tune = {"sort": 0.8, "add": 0.5}
    rows = [quality.row_from_report("base", _report({"sort": 0.2, "add": 0.1}, fine_tune), reference=True),
            quality.row_from_report("ties", _report({"sort": 0.4, "add": 0.25}, fine_tune))]
    assert quality.render_table(["sort", "add"], rows) == (
        "| model | sort | add | average | average normalised |\n"
        "|---|---:|---:|---:|---:|\n"
        "| base | 0.20 | 0.10 | 0.15 | 0.225 |\n"
        "| ties | 0.40 | 0.25 | 0.33 | 0.500 |"
    )


def test_render_table_without_normalised_average():
    row = quality.row_from_report("linear", _report({"sort": 0.0}, {"sort": 0.0}))
    assert quality.render_table(["sort"], [row]).splitlines()[-1] == "| linear | 0.00 | 0.00 | - |"


def test_render_section_lists_run_and_families():
    fine_tune = {"sort": 0.8}
    family = quality.FamilyResult(name="lm", tasks=["sort"], examples={"sort": 100},
                                  rows=[quality.row_from_report("ties", _report({"sort": 0.4}, fine_tune))],
                                  parameters={"ties": "density 0.2, lambda 1.0"})
    run = quality.RunInfo(command="python benchmarks/quality.py --size test", size="test", zoo="build/zoo/test",
                          settings_hash="abc123", zoo_status="reused", wall_s=61.2, merge_s=5.0, eval_s=50.0,
                          machine="2 cores", date="2026-01-01")
    lines = quality.render_section(run, [family], "images/merge-quality.png").splitlines()
    assert "- Command: `python benchmarks/quality.py --size test`" in lines
    assert "- Zoo: size `test` at `build/zoo/test`, settings hash `abc123` (reused)" in lines
    assert "- Wall time: 61 s in all, of which 5 s merging and 50 s evaluating" in lines
    assert "- Machine: 2 cores" in lines
    assert "### lm family: 1 tasks, 100 held-out examples each" in lines
    assert "| ties | 0.40 | 0.40 | 0.500 |" in lines
    assert "- `ties`: density 0.2, lambda 1.0" in lines
    assert lines[-1] == "![Average normalised accuracy of each merge method, per family](images/merge-quality.png)"


def test_describe_parameters():
    recipe = {"parameters": {"density": 0.2, "normalize": True},
              "models": [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "b"}]}
    assert quality.describe_parameters(recipe) == 'density 0.2, normalize true, per-model parameters: {"weight": 2.0}'
    assert quality.describe_parameters({"models": []}) == "defaults"


START, END = quality.SECTION_START, quality.SECTION_END


def test_replace_section_keeps_rest_of_page():
    page = f"# Benchmarks\n\nintro\n\n## Merge quality\n\n{START}\nold table\n{END}\n\n## Later\ntext without newline"
    replaced = quality.replace_section(page, "new table\nline two")
    assert replaced == (f"# Benchmarks\n\nintro\n\n## Merge quality\n\n{START}\nnew table\nline two\n{END}"
                        "\n\n## Later\ntext without newline")
    assert quality.replace_section(replaced, "new table\nline two") == replaced


def test_replace_section_appends_when_missing():
    assert quality.replace_section("# Benchmarks\n\ntext\n", "table") == (
        f"# Benchmarks\n\ntext\n\n## Merge quality on the model zoo\n\n{START}\ntable\n{END}\n")
    assert quality.replace_section("# Benchmarks", "table") == (
        f"# Benchmarks\n\n## Merge quality on the model zoo\n\n{START}\ntable\n{END}\n")
    assert quality.replace_section("", "table") == f"## Merge quality on the model zoo\n\n{START}\ntable\n{END}\n"


@pytest.mark.parametrize("page", [f"{START}\ntable\n", f"table\n{END}\n", f"{END}\n{START}\n",
                                  f"{START}\n{END}\n{START}\n{END}\n"],
                         ids=["start only", "end only", "reversed", "twice"])
def test_replace_section_rejects_broken_markers(page):
    with pytest.raises(quality.BenchmarkError, match="must contain .* once, followed by"):
        quality.replace_section(page, "table")


def test_plot_summary_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    fine_tune = {"sort": 0.8, "add": 0.5}
    rows = [quality.row_from_report("base", _report({"sort": 0.2, "add": 0.1}, fine_tune), reference=True),
            quality.row_from_report("ties", _report({"sort": 0.4, "add": 0.0}, {"sort": 0.8, "add": 0.0}))]
    families = [quality.FamilyResult(name="lm", tasks=["sort", "add"], examples={"sort": 10, "add": 10}, rows=rows)]
    png = tmp_path / "images" / "chart.png"
    quality.plot_summary(families, png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_recipes_runs_bench_recipes_unchanged():
    recipes = quality.read_recipes(quality.RECIPE_DIR)
    lm_ties = next(recipe for recipe in recipes if recipe.family == "lm" and recipe.method == "ties")
    bench_lm = _family([quality.task_of(entry["model"]) for entry in lm_ties.data["models"]])
    manifest = {"families": {"lm": bench_lm}}
    planned = quality.plan_recipes(recipes, manifest, quality.REPO_ROOT / quality.BENCH_ZOO, None, list(METHODS))

    assert [recipe.label for recipe, _ in planned["lm"]] == [*METHODS, *LM_ONLY]
    for recipe, output in planned["lm"]:
        assert recipe.path == quality.RECIPE_DIR / f"lm-{recipe.label}.yaml"
        assert output == quality.REPO_ROOT / "build" / "merged" / "zoo" / f"lm-{recipe.label}"


def test_choose_zoo_rejects_test_size_at_bench_folder():
    assert quality.choose_zoo("test", None) == quality.REPO_ROOT / "build" / "zoo" / "test"
    assert quality.choose_zoo("bench", None) == quality.REPO_ROOT / "build" / "zoo" / "bench"
    with pytest.raises(quality.BenchmarkError, match="pass --size bench or another --zoo"):
        quality.choose_zoo("test", quality.REPO_ROOT / "build" / "zoo" / "bench")
