"""The recipe room: schema, YAML loading with line numbers, and per-tensor parameter resolution."""

from mergekit_plus.recipe.schema import Recipe
from mergekit_plus.recipe.validate import load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]
