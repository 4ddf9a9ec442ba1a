"""YAML loading that remembers where each key and value sits, for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergekit_plus.errors import RecipeError

YamlPath = tuple[str | int, ...]


class LocatedYaml:
    """Parsed YAML data plus the 1-based line of every mapping key and sequence item."""

    def __init__(self, data: Any, lines: dict[YamlPath, int], source: str) -> None:
        self.data = data
        self.lines = lines
        self.source = source

    def line_of(self, path: YamlPath) -> int | None:
        """Return the line of `path`, or of its closest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def where(self, path: YamlPath) -> str:
        """Describe `path` for a message: `models[0].parameters.weight (line 7)`."""
        text = format_path(path) or "the recipe's top level"
        line = self.line_of(path)
        return f"{text} (line {line})" if line is not None else text


def format_path(path: YamlPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def load_located_yaml(text: str, *, source: str) -> LocatedYaml:
    """Parse `text` and record the line of every node. Raise RecipeError on a YAML syntax error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        hint = ("; check the indentation: keys of one mapping must line up, and YAML allows spaces only, "
                "not tabs")
        raise RecipeError([f"invalid YAML at {where}: {problem}{hint}"], source=source) from exc

    lines: dict[YamlPath, int] = {}
    duplicates: list[str] = []
    if root is not None:
        lines[()] = root.start_mark.line + 1
        _collect_lines(root, (), lines, duplicates)
    if duplicates:
        raise RecipeError(duplicates, source=source)
    return LocatedYaml(data, lines, source)


def load_recipe_file(path: str | Path) -> LocatedYaml:
    """Read and parse a recipe file; a missing or unreadable file is a RecipeError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RecipeError([f"recipe file not found: {path}"], source=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read recipe file {path}: {exc}"], source=str(path)) from exc
    return load_located_yaml(text, source=str(path))


def _collect_lines(node: yaml.Node, path: YamlPath, lines: dict[YamlPath, int], duplicates: list[str]) -> None:
    # PyYAML keeps the last of two equal keys without a word; a recipe must not lose a value that way.
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            line = key_node.start_mark.line + 1
            if child in lines:
                duplicates.append(f"{format_path(child)} (line {line}): duplicate key `{key}`, first given on "
                                  f"line {lines[child]}; keep one")
            lines[child] = line
            _collect_lines(value_node, child, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _collect_lines(item, child, lines, duplicates)
