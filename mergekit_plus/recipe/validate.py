"""Recipe validation: structure, keys, method parameters. Every problem is collected, then raised at once."""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergekit_plus.errors import RecipeError
from mergekit_plus.methods import get_method, list_methods
from mergekit_plus.methods.base import MergeMethod, Param
from mergekit_plus.learn.data import check_data_source, check_labelled_source, task_of_model
from mergekit_plus.recipe.schema import (
    DATA_KEYS,
    MODEL_KEYS,
    OUTPUT_KEYS,
    TOKENIZER_KEYS,
    TOP_LEVEL_KEYS,
    UNSUPPORTED_MERGEKIT_KEYS,
    Recipe,
)
from mergekit_plus.recipe.yaml_lines import LocatedYaml, YamlPath, format_path, load_recipe_file

FILTER_ENTRY_KEYS = ("filter", "value")

# mergekit parameters that only change how mergekit stores temporaries, never the result. They are
# accepted so that mergekit recipes run unchanged, and the plan logs that they have no effect here.
MERGEKIT_IGNORED_PARAMS = {
    "int8_mask": "masks are never stored as float tensors here, so int8_mask has no effect",
}


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file. Raise RecipeError listing every problem found."""
    return parse_recipe(load_recipe_file(path))


def parse_recipe(located: LocatedYaml) -> Recipe:
    """Validate parsed YAML against the schema and the chosen method. Raise RecipeError listing every problem."""
    data = located.data
    if not isinstance(data, dict):
        raise RecipeError(["the recipe must be a YAML mapping with keys such as merge_method and models"],
                          source=located.source)

    problems: list[str] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(_describe_schema_error(error, located) for error in exc.errors())
    problems.extend(_check_method_parameters(data, located))
    problems.extend(_check_references(data, located))
    problems.extend(_check_data(data, located))

    if problems or recipe is None:
        raise RecipeError(sorted(_unique(problems), key=_line_number), source=located.source)
    return recipe


def _line_number(problem: str) -> int:
    match = re.search(r"\(line (\d+)\)", problem)
    return int(match.group(1)) if match else 0


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    """Return the candidate closest to `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _unique(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def _keys_at(path: YamlPath) -> tuple[str, ...]:
    """Return the valid keys of the mapping at `path` in the recipe schema, or () when keys are free-form."""
    if not path:
        return TOP_LEVEL_KEYS
    if path[0] == "models" and len(path) == 2:
        return MODEL_KEYS
    if path == ("base_model",):
        return ("model", "revision")
    if path == ("output",):
        return OUTPUT_KEYS
    if path == ("tokenizer",):
        return TOKENIZER_KEYS
    if path[:1] == ("data",) and len(path) == 2:
        return DATA_KEYS
    return ()


def _all_param_names() -> set[str]:
    return {p.name for method in list_methods() for p in method.params}


def _describe_schema_error(error: dict[str, Any], located: LocatedYaml) -> str:
    loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    kind = error["type"]

    if kind == "extra_forbidden":
        key = str(loc[-1])
        parent = loc[:-1]
        where = located.where(loc)
        if key in UNSUPPORTED_MERGEKIT_KEYS and not parent:
            return f"{where}: `{key}` is not supported: {UNSUPPORTED_MERGEKIT_KEYS[key]}"
        if key in MERGEKIT_IGNORED_PARAMS:
            return f"{where}: `{key}` is a method parameter; move it under `parameters:`"
        if key in _all_param_names() and parent[:1] in (("models",), ()):
            target = "under `parameters:` of this model" if parent else "under the top-level `parameters:`"
            return f"{where}: unknown key `{key}`; it is a method parameter, so move it {target}"
        suggestion = did_you_mean(key, _keys_at(parent))
        hint = f"; did you mean `{suggestion}`?" if suggestion else f"; valid keys here: {', '.join(_keys_at(parent))}"
        return f"{where}: unknown key `{key}`{hint}"

    if kind == "missing":
        return f"{located.where(loc[:-1]) if loc[:-1] else 'recipe'}: missing required key `{format_path(loc[-1:])}`"

    message = error.get("msg", "invalid value")
    message = message.removeprefix("Value error, ")
    given = error.get("input")
    shown = ""
    if given is not None and not isinstance(given, (dict, list)) and repr(given) not in message:
        shown = f" (got {given!r})"
    return f"{located.where(loc)}: {message}{shown}"


def _check_method_parameters(data: dict[str, Any], located: LocatedYaml) -> list[str]:
    name = data.get("merge_method")
    if not isinstance(name, str):
        return []  # the schema check reports a missing or non-string merge_method
    method = get_method(name)
    if method is None:
        names = sorted({m.name for m in list_methods()})
        suggestion = did_you_mean(name, names)
        hint = f"did you mean `{suggestion}`?" if suggestion else f"available: {', '.join(names)}"
        return [f"{located.where(('merge_method',))}: unknown merge method `{name}`; {hint} "
                "(`merge methods` lists them)"]

    problems: list[str] = []
    if method.requires_base and not data.get("base_model"):
        problems.append(f"recipe: method `{method.name}` needs `base_model` (the pretrained checkpoint the "
                        "fine-tunes started from); add `base_model: PATH_OR_HUB_ID`")

    parameters = data.get("parameters")
    if isinstance(parameters, dict):
        for key, value in parameters.items():
            problems.extend(_check_one_parameter(method, key, value, ("parameters", key), located, per_model=False))

    models = data.get("models")
    if isinstance(models, list):
        if not models:
            problems.append(f"{located.where(('models',))}: `models` is empty; list at least one model")
        for index, entry in enumerate(models):
            if not isinstance(entry, dict):
                continue
            model_parameters = entry.get("parameters")
            if not isinstance(model_parameters, dict):
                continue
            for key, value in model_parameters.items():
                path = ("models", index, "parameters", key)
                problems.extend(_check_one_parameter(method, key, value, path, located, per_model=True))
    return problems


def _check_one_parameter(method: MergeMethod, key: Any, value: Any, path: YamlPath,
                         located: LocatedYaml, *, per_model: bool) -> list[str]:
    where = located.where(path)
    param = method.param(str(key))
    if param is None and str(key) in MERGEKIT_IGNORED_PARAMS:
        return []
    if param is None:
        names = [p.name for p in method.params]
        suggestion = did_you_mean(str(key), names)
        hint = f"did you mean `{suggestion}`?" if suggestion else f"its parameters are: {', '.join(names) or 'none'}"
        return [f"{where}: method `{method.name}` has no parameter `{key}`; {hint}"]
    if per_model and not param.per_model:
        return [f"{where}: `{key}` is a global parameter of `{method.name}`; move it to the top-level `parameters:`"]
    return [f"{where}: {problem}" for problem in check_param_value(param, value)]


def check_param_value(param: Param, value: Any) -> list[str]:
    """Check one recipe value of `param` in any of its forms: scalar, gradient list, or filter list."""
    if isinstance(value, list):
        if not value:
            return [f"`{param.name}` is an empty list; give a value, a gradient list or a filter list"]
        if all(isinstance(item, dict) for item in value):
            return _check_filter_list(param, value)
        if param.kind not in (float, int):
            return [f"`{param.name}` takes a {param.kind.__name__}; a gradient list only works for numbers"]
        problems: list[str] = []
        for item in value:
            if isinstance(item, str) and item in getattr(param, "keywords", ()):
                problems.append(f"`{param.name}: {item}` cannot be part of a gradient list; give it alone")
                continue
            problems.extend(check_scalar(param, item))
        return problems
    # A keyword such as `mask_lambda: auto` stands for a number that the method chooses, so it is
    # valid alone or in a filter entry, never inside a gradient list.
    if isinstance(value, str) and value in getattr(param, "keywords", ()):
        return []
    return check_scalar(param, value)


def _check_filter_list(param: Param, entries: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    for index, entry in enumerate(entries):
        for key in entry:
            if key not in FILTER_ENTRY_KEYS:
                suggestion = did_you_mean(str(key), FILTER_ENTRY_KEYS)
                hint = f"; did you mean `{suggestion}`?" if suggestion else ""
                problems.append(f"`{param.name}` filter entry {index} has unknown key `{key}`{hint}")
        if "value" not in entry:
            problems.append(f"`{param.name}` filter entry {index} has no `value`")
            continue
        if "filter" in entry and not isinstance(entry["filter"], str):
            problems.append(f"`{param.name}` filter entry {index}: `filter` must be a string")
        inner = entry["value"]
        if isinstance(inner, list) and inner and all(isinstance(item, dict) for item in inner):
            problems.append(f"`{param.name}` filter entry {index}: a filter list cannot nest another")
            continue
        problems.extend(check_param_value(param, inner))
    return problems


def check_scalar(param: Param, value: Any) -> list[str]:
    """Check a single value's type, choices and range against `param`."""
    if param.kind is bool:
        if not isinstance(value, bool):
            return [f"`{param.name}` must be true or false, got {value!r}"]
        return []
    if param.kind is str:
        if not isinstance(value, str):
            return [f"`{param.name}` must be a string, got {value!r}"]
        if param.choices and value not in param.choices:
            suggestion = did_you_mean(value, param.choices)
            hint = f" (did you mean `{suggestion}`?)" if suggestion else ""
            return [f"`{param.name}` must be one of {', '.join(param.choices)}, got {value!r}{hint}"]
        return []
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        keywords = "".join(f" or `{keyword}`" for keyword in getattr(param, "keywords", ()))
        return [f"`{param.name}` must be a number{keywords}, got {value!r}"]
    if param.kind is int and not isinstance(value, int):
        return [f"`{param.name}` must be an integer, got {value!r}"]
    if not math.isfinite(value):
        return [f"`{param.name}` must be a finite number, got {value}"]
    if param.minimum is not None and value < param.minimum:
        return [f"`{param.name}` must be at least {param.minimum}, got {value}"]
    if param.maximum is not None and value > param.maximum:
        return [f"`{param.name}` must be at most {param.maximum}, got {value}"]
    return []


def _check_references(data: dict[str, Any], located: LocatedYaml) -> list[str]:
    """Check that the tokenizer source names an input of the recipe."""
    tokenizer = data.get("tokenizer")
    source = tokenizer.get("source") if isinstance(tokenizer, dict) else data.get("tokenizer_source")
    if not isinstance(source, str) or source == "base":
        return []
    models = data.get("models")
    names = [entry.get("model") for entry in models if isinstance(entry, dict)] if isinstance(models, list) else []
    names = [name for name in names if isinstance(name, str)]
    if source in names:
        return []
    path = ("tokenizer", "source") if isinstance(tokenizer, dict) else ("tokenizer_source",)
    if source == "union":
        return [f"{located.where(path)}: the `union` tokenizer policy is not supported yet; "
                "use `base` or one of the `models` entries"]
    suggestion = did_you_mean(source, names)
    hint = f"did you mean `{suggestion}`?" if suggestion else "use `base` or a `model:` value from `models`"
    return [f"{located.where(path)}: tokenizer source `{source}` is not an input of this recipe; {hint}"]


def _check_data(data: dict[str, Any], located: LocatedYaml) -> list[str]:
    """Check the `data:` section against the method and the models' tasks, and its files, before any model loads."""
    section = data.get("data")
    method = get_method(data["merge_method"]) if isinstance(data.get("merge_method"), str) else None
    if method is None:
        return []
    models = data.get("models") if isinstance(data.get("models"), list) else []
    if not getattr(method, "uses_data", False):
        problems = [f"{located.where(('models', index, 'task'))}: method `{method.name}` learns nothing from data, "
                    "so `task:` would have no effect; remove it"
                    for index, entry in enumerate(models) if isinstance(entry, dict) and "task" in entry]
        if section is not None:
            problems.append(f"{located.where(('data',))}: method `{method.name}` learns nothing from data, so "
                            "`data:` would have no effect; remove it")
        return problems
    if section is None:
        return []
    if not isinstance(section, dict):
        return []  # the schema check reports the wrong type

    where = located.where(("data",))
    problems: list[str] = []
    tasks = [task_of_model(entry["model"], entry.get("task") if isinstance(entry.get("task"), str) else None)
             for entry in models if isinstance(entry, dict) and isinstance(entry.get("model"), str)]
    for task, entry in section.items():
        entry_where = located.where(("data", task))
        if str(task) not in tasks:
            suggestion = did_you_mean(str(task), tasks)
            hint = f"did you mean `{suggestion}`?" if suggestion else f"the models' tasks are: {', '.join(tasks)}"
            problems.append(f"{entry_where}: no model has task `{task}` (a folder `ft-{task}` or `task: {task}`); "
                            f"{hint}")
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            problem = check_data_source(entry["path"])
            if problem is None and getattr(method, "labelled_data", False):
                problem = check_labelled_source(entry["path"])
            if problem is not None:
                problems.append(f"{located.where(('data', task, 'path'))}: {problem}")
    if not getattr(method, "data_for_every_model", True):
        # Models without data are candidates only, but something must give the loss.
        if not section:
            problems.append(f"{where}: no entry; method `{method.name}` needs data for at least one task, such as "
                            f"`{tasks[0] if tasks else 'TASK'}: {{path: FILE}}`")
        return problems
    for task in tasks:
        if task not in section:
            problems.append(f"{where}: no entry for task `{task}`; add `{task}: {{path: FILE}}` or set the "
                            "model's `task:` to a task listed here")
    return problems
