"""The model card check and front-matter merge that run before every upload (`mergekit_plus.hub.card`)."""

from __future__ import annotations

import hashlib
import re

import pytest
from upload_helpers import copy_folder

from mergekit_plus.errors import InputError
from mergekit_plus.hub.card import prepare_card


@pytest.fixture
def folder(merged_folder, tmp_path):
    """A copy of the merged folder that the test may change."""
    return copy_folder(merged_folder, tmp_path / "merged")


def edit_card(folder, old: str, new: str) -> None:
    path = folder / "README.md"
    text = path.read_text()
    assert old in text, f"{old!r} not in the card"
    path.write_text(text.replace(old, new, 1))


def test_own_card_sent_unchanged(folder):
    card = prepare_card(folder)

    assert card.text == (folder / "README.md").read_text()
    assert card.added == ()
    assert card.method == "ties"
    assert card.seed == 0
    assert card.recipe_sha256 == hashlib.sha256((folder / "merge_recipe.yaml").read_bytes()).hexdigest()
    assert [item.role for item in card.inputs] == ["base", "model", "model"]
    assert all(item.is_local for item in card.inputs)


def test_user_keys_kept_merge_keys_added(folder):
    edit_card(folder, "library_name: transformers\ntags:\n- merge\n- mergekit_plus\n- ties\n",
              "license: apache-2.0\nlanguage:\n- en\ntags:\n- merge\n")

    card = prepare_card(folder)

    assert card.metadata["license"] == "apache-2.0"
    assert card.metadata["language"] == ["en"]
    assert card.metadata["tags"] == ["merge", "mergekit_plus", "ties"]
    assert card.metadata["library_name"] == "transformers"
    assert card.added == ("tags mergekit_plus, ties", "library_name transformers")
    assert card.text.startswith("---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n")


def test_hub_input_added_to_base_model(folder):
    commit = "a" * 40
    edit_card(folder, "| local folder |  |\n| model |", f"| local folder |  |\n| model | `org/extra` | main | {commit} |\n| model |")

    card = prepare_card(folder)

    assert card.metadata["base_model"] == ["org/extra"]
    assert card.metadata["base_model_relation"] == "merge"
    assert "base_model org/extra" in card.added


def test_user_base_model_relation_kept(folder):
    edit_card(folder, "library_name:", "base_model: org/other\nbase_model_relation: finetune\nlibrary_name:")

    card = prepare_card(folder)

    assert card.metadata["base_model"] == "org/other"
    assert card.metadata["base_model_relation"] == "finetune"


@pytest.mark.parametrize("entry", ["./ckpt/base", "/abs/path/to/model", "org/a/b"])
def test_local_path_in_base_model_rejected(folder, entry):
    edit_card(folder, "library_name:", f"base_model:\n- {entry}\nlibrary_name:")

    with pytest.raises(InputError, match=rf"base_model lists '{re.escape(entry)}'.*not a Hub repo id"):
        prepare_card(folder)


def test_existing_local_folder_in_base_model_rejected(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    edit_card(folder, "library_name:", f"base_model:\n- {folder.name}\nlibrary_name:")

    with pytest.raises(InputError, match=r"base_model lists 'merged', which is a local path"):
        prepare_card(folder)


def test_changed_recipe_copy_rejected(folder):
    recipe = folder / "merge_recipe.yaml"
    recipe.write_text(recipe.read_text().replace("density: 0.5", "density: 0.6"))

    with pytest.raises(InputError, match=r"describes another recipe"):
        prepare_card(folder)


def test_invalid_front_matter_rejected(folder):
    edit_card(folder, "library_name: transformers\n", "library_name: [transformers\n")

    with pytest.raises(InputError, match=r"invalid front matter"):
        prepare_card(folder)


def test_body_facts_required(folder):
    edit_card(folder, "- seed: 0\n", "")
    edit_card(folder, "## Parameters as used", "## Parameters")
    edit_card(folder, "(`ties`;", "(ties;")

    with pytest.raises(InputError) as caught:
        prepare_card(folder)

    message = str(caught.value)
    assert "does not state the seed (0)" in message
    assert "no `## Parameters as used` section" in message
    assert "does not name the merge method `ties`" in message


def test_hub_input_needs_commit(folder):
    edit_card(folder, "| local folder |  |\n| model |", "| local folder |  |\n| model | `org/extra` | main | unknown |\n| model |")

    with pytest.raises(InputError, match=r"Hub input org/extra has no commit hash \(found 'unknown'\)"):
        prepare_card(folder)


@pytest.mark.parametrize("name, message", [("README.md", r"the model card\) is missing"),
                                           ("merge_recipe.yaml", r"merge_recipe\.yaml is missing")])
def test_missing_file_rejected(folder, name, message):
    (folder / name).unlink()

    with pytest.raises(InputError, match=message):
        prepare_card(folder)
