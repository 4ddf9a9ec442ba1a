"""End to end: a recipe with a Hub-id input, merged and pushed to the stand-in, twice.

The base is `hub_repo_id`, whose snapshot is only in the local Hugging Face cache. With offline
mode off, huggingface_hub first requests that repo's info from the stand-in, which returns 404
because it does not have the repo. The client then uses the cached snapshot and its commit, as it
does for any repo that the Hub does not show.
"""

from __future__ import annotations

import json
import re

import yaml
from merge_helpers import invoke, load_and_generate, write_recipe
from upload_helpers import HUB_TOKEN, TARGET_REPO, folder_files, sha256_of

SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "chat_template.jinja", "merge_recipe.yaml", "README.md"]


def dare_ties_recipe(base, fine_tunes, output) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": [{"model": fine_tune, "parameters": {"weight": 1.0, "density": 0.5}} for fine_tune in fine_tunes],
        "seed": 7,
        "output": {"path": output, "shard_size": "20KB"},
    }


def test_push_sends_checkpoint_and_card(tmp_path, hub_standin, hub_repo_id, llama_fine_tunes):
    import checkpoints
    from huggingface_hub import ModelCard

    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, dare_ties_recipe(hub_repo_id, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--push-to-hub", TARGET_REPO, "--json"], expected_exit=0)

    summary = json.loads(result.stdout)
    stored = hub_standin.repos[TARGET_REPO].files()
    local = folder_files(output)
    # Every file of the folder arrived unchanged, beside the .gitattributes of the new repo.
    assert sorted(stored) == sorted([*local, ".gitattributes"])
    for name, content in local.items():
        assert stored[name] == content, name
    shards = sorted(name for name in stored if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name))
    assert len(shards) >= 2
    index = json.loads(stored["model.safetensors.index.json"])
    assert sorted(set(index["weight_map"].values())) == shards
    for name in SIDE_FILES:
        assert name in stored, name

    # The card parses as the Hub parses it, names the Hub input with its cached commit, and the recipe's hash.
    card = ModelCard(stored["README.md"].decode())
    assert card.data.base_model == [hub_repo_id]
    assert card.data.base_model_relation == "merge"
    assert {"merge", "mergekit_plus", "dare_ties"} <= set(card.data.tags)
    commit = checkpoints.commit_hash(hub_repo_id)
    assert re.search(rf"`{re.escape(hub_repo_id)}` \| main \| {commit} \|", card.text), card.text
    assert f"`{sha256_of(stored['merge_recipe.yaml'])}`" in card.text
    assert re.search(r"^- seed: 7$", card.text, re.MULTILINE)
    for model in llama_fine_tunes:
        assert model.name in card.text
        assert model.name not in yaml.safe_dump(card.data.to_dict())

    # The JSON summary describes the files and the commit that the stand-in stored.
    assert summary["ok"] is True
    assert {entry["path"]: entry["sha256"] for entry in summary["files"]} == {
        name: sha256_of(content) for name, content in local.items()}
    assert summary["hub"]["commit"] == hub_standin.repos[TARGET_REPO].branches["main"]
    assert summary["hub"]["created_repo"] is True
    assert summary["recipe_sha256"] == sha256_of(stored["merge_recipe.yaml"])

    # The token went in the Authorization header and nowhere else.
    assert HUB_TOKEN not in result.output
    assert all(HUB_TOKEN.encode() not in content for content in stored.values())
    writes = [request for request in hub_standin.requests if request.route in ("create", "preupload", "commit")]
    assert writes and all(request.authorization == f"Bearer {HUB_TOKEN}" for request in writes)
    load_and_generate(output)


def test_second_run_changes_nothing(tmp_path, hub_standin, hub_repo_id, llama_fine_tunes):
    first_output, second_output = tmp_path / "first", tmp_path / "second"
    first = write_recipe(tmp_path, dare_ties_recipe(hub_repo_id, llama_fine_tunes, first_output), name="first.yaml")
    invoke(["run", first, "--push-to-hub", TARGET_REPO, "--quiet"], expected_exit=0)
    repo = hub_standin.repos[TARGET_REPO]
    commits_after_first = len(repo.commits)
    head_after_first = repo.branches["main"]

    # The same recipe into another folder: same inputs, same seed, so the same bytes, card included.
    second = write_recipe(tmp_path, dare_ties_recipe(hub_repo_id, llama_fine_tunes, first_output), name="second.yaml")
    result = invoke(["run", second, "-o", second_output, "--push-to-hub", TARGET_REPO, "--json"], expected_exit=0)

    first_hashes = {name: sha256_of(content) for name, content in folder_files(first_output).items()}
    second_hashes = {name: sha256_of(content) for name, content in folder_files(second_output).items()}
    assert first_hashes == second_hashes
    summary = json.loads(result.stdout)
    assert summary["hub"]["committed"] == []
    assert sorted(summary["hub"]["unchanged"]) == sorted(first_hashes)
    assert summary["hub"]["created_repo"] is False
    assert len(repo.commits) == commits_after_first
    assert repo.branches["main"] == head_after_first
    assert list(hub_standin.repos) == [TARGET_REPO]
