"""`merge upload` and `merge run --push-to-hub` against the stand-in: files, token handling, retries, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from merge_helpers import assert_mentions, invoke, message_of, write_recipe
from upload_helpers import HUB_TOKEN, TARGET_REPO, copy_folder, folder_files, sha256_of, ties_recipe

WRITE_ROUTES = ("create", "branch", "preupload", "commit")


def upload_commits(standin, repo_id: str = TARGET_REPO) -> list:
    """Return the commits of `repo_id` after the repo's initial one."""
    return standin.repos[repo_id].commits[1:]


def assert_token_hidden(text: str) -> None:
    assert HUB_TOKEN not in text
    assert HUB_TOKEN[8:24] not in text


# What arrives


def test_upload_sends_every_file(hub_standin, merged_folder):
    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=0)

    stored = hub_standin.repos[TARGET_REPO].files()
    assert {name: content for name, content in stored.items() if name != ".gitattributes"} == folder_files(merged_folder)
    commits = upload_commits(hub_standin)
    assert len(commits) == 1
    assert commits[0].summary == "Upload ties merge (mergekit_plus 0.1.0)"
    assert sorted(commits[0].added) == sorted(folder_files(merged_folder))
    assert hub_standin.routes_called() == ["whoami", "create", "validate-yaml", "preupload", "commit"]
    assert_mentions(message_of(result), TARGET_REPO, r"branch main")


def test_upload_json_summary(hub_standin, merged_folder):
    result = invoke(["upload", merged_folder, TARGET_REPO, "--json"], expected_exit=0)

    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    assert summary["hub"]["repo_id"] == TARGET_REPO
    assert summary["hub"]["commit"] == hub_standin.repos[TARGET_REPO].branches["main"]
    assert sorted(summary["hub"]["committed"]) == sorted(folder_files(merged_folder))
    assert [entry["path"] for entry in summary["files"]] == sorted(folder_files(merged_folder))


def test_run_json_without_push(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--json"], expected_exit=0)

    summary = json.loads(result.stdout)
    assert summary["hub"] is None
    assert summary["output"] == str(output)
    files = {entry["path"]: entry["sha256"] for entry in summary["files"]}
    assert files == {name: sha256_of(content) for name, content in folder_files(output).items()}
    assert summary["recipe_sha256"] == files["merge_recipe.yaml"]


def test_upload_skips_hidden_files(hub_standin, merged_folder, tmp_path):
    folder = copy_folder(merged_folder, tmp_path / "merged")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("tool state\n")

    invoke(["upload", folder, TARGET_REPO, "--quiet"], expected_exit=0)

    stored = hub_standin.repos[TARGET_REPO].files()
    assert not [name for name in stored if name.startswith(".cache")]


def test_private_creates_private_repo(hub_standin, merged_folder):
    invoke(["upload", merged_folder, TARGET_REPO, "--private", "--quiet"], expected_exit=0)

    assert hub_standin.repos[TARGET_REPO].private is True


def test_private_on_public_repo_rejected(hub_standin, merged_folder):
    hub_standin.add_repo(TARGET_REPO, {"notes.txt": b"an earlier upload\n"}, private=False)

    result = invoke(["upload", merged_folder, TARGET_REPO, "--private"], expected_exit=5)

    assert_mentions(message_of(result), r"already exists and is public", r"Nothing was uploaded", r"drop --private")
    assert hub_standin.repos[TARGET_REPO].files() == {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                                      "notes.txt": b"an earlier upload\n"}
    assert "commit" not in hub_standin.routes_called()


def test_revision_commits_to_new_branch(hub_standin, merged_folder):
    invoke(["upload", merged_folder, TARGET_REPO, "--revision", "experiments", "--quiet"], expected_exit=0)

    repo = hub_standin.repos[TARGET_REPO]
    assert sorted(repo.branches) == ["experiments", "main"]
    assert sorted(repo.files("main")) == [".gitattributes"]
    assert "README.md" in repo.files("experiments")


def test_existing_card_front_matter_kept(hub_standin, merged_folder, tmp_path):
    folder = copy_folder(merged_folder, tmp_path / "merged")
    card = (folder / "README.md").read_text()
    # A user adds a license and drops the tags that `merge run` wrote.
    edited = card.replace("library_name: transformers\n", "license: apache-2.0\n").replace(
        "tags:\n- merge\n- mergekit_plus\n- ties\n", "tags:\n- my-tag\n")
    assert edited != card
    (folder / "README.md").write_text(edited)

    invoke(["upload", folder, TARGET_REPO, "--quiet"], expected_exit=0)

    from huggingface_hub import ModelCard

    uploaded = ModelCard(hub_standin.repos[TARGET_REPO].files()["README.md"].decode())
    assert uploaded.data.license == "apache-2.0"
    assert uploaded.data.tags == ["my-tag", "merge", "mergekit_plus", "ties"]
    assert uploaded.data.library_name == "transformers"
    assert uploaded.text == ModelCard(edited).text
    # The folder keeps the user's card; only the upload adds the merge's keys.
    assert (folder / "README.md").read_text() == edited


# Retries


def test_second_upload_sends_nothing(hub_standin, merged_folder):
    invoke(["upload", merged_folder, TARGET_REPO, "--quiet"], expected_exit=0)
    head = hub_standin.repos[TARGET_REPO].branches["main"]

    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=0)

    assert list(hub_standin.repos) == [TARGET_REPO]
    assert len(upload_commits(hub_standin)) == 1
    assert hub_standin.repos[TARGET_REPO].branches["main"] == head
    assert_mentions(message_of(result), r"already contains every file")


def test_changed_file_alone_committed(hub_standin, merged_folder, tmp_path):
    folder = copy_folder(merged_folder, tmp_path / "merged")
    invoke(["upload", folder, TARGET_REPO, "--quiet"], expected_exit=0)
    config = json.loads((folder / "config.json").read_text())
    config["note"] = "changed"
    (folder / "config.json").write_text(json.dumps(config))

    result = invoke(["upload", folder, TARGET_REPO, "--json"], expected_exit=0)

    commits = upload_commits(hub_standin)
    assert len(commits) == 2
    assert sorted(commits[1].added) == ["config.json"]
    assert json.loads(result.stdout)["hub"]["committed"] == ["config.json"]


def test_failed_commit_reports_and_retries(hub_standin, merged_folder):
    hub_standin.fail_next("commit", status=500, message="storage unavailable")

    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=5)

    count = len(folder_files(merged_folder))
    assert_mentions(message_of(result), r"committing the files", r"HTTP 500", r"storage unavailable",
                    r"created by this upload but contains none of its files", rf"none of the {count} files was committed",
                    r"retry \(a retry reuses the repo")
    assert sorted(hub_standin.repos[TARGET_REPO].files()) == [".gitattributes"]

    invoke(["upload", merged_folder, TARGET_REPO, "--quiet"], expected_exit=0)

    assert list(hub_standin.repos) == [TARGET_REPO]
    assert len(upload_commits(hub_standin)) == 1
    assert hub_standin.routes_called().count("create") == 2


def test_failed_create_uploads_nothing(hub_standin, merged_folder):
    hub_standin.fail_next("create", status=503, message="try later")

    result = invoke(["upload", merged_folder, TARGET_REPO, "--json"], expected_exit=5)

    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    assert summary["exit_code"] == 5
    assert_mentions(" ".join(summary["errors"]), r"creating the repo", r"HTTP 503", r"Nothing was uploaded")
    assert hub_standin.repos == {}


def test_forbidden_namespace_reported(hub_standin, merged_folder):
    hub_standin.fail_next("create", status=403, message="You don't have the rights to create a model under this namespace")

    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=5)

    assert_mentions(message_of(result), r"HTTP 403", r"rights to create", r"write access to my-org")
    assert hub_standin.repos == {}


def test_failed_push_keeps_merged_folder(hub_standin, tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))
    hub_standin.fail_next("commit", status=502, message="bad gateway")

    result = invoke(["run", recipe, "--push-to-hub", TARGET_REPO, "--revision", "exp", "--quiet"], expected_exit=5)

    assert (output / "README.md").exists()
    assert_mentions(message_of(result), r"HTTP 502", rf"`merge upload {output} {TARGET_REPO} --revision exp`")

    invoke(["upload", output, TARGET_REPO, "--revision", "exp", "--quiet"], expected_exit=0)
    assert "model.safetensors.index.json" in hub_standin.repos[TARGET_REPO].files("exp")


# The token


def test_token_from_login_cache(hub_standin, merged_folder, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    token_file = tmp_path / "hf-home" / "token"
    token_file.parent.mkdir()
    token_file.write_text(HUB_TOKEN)
    # `hf auth login` writes the token to this path, which huggingface_hub reads from HF_HOME at import.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))

    invoke(["upload", merged_folder, TARGET_REPO, "--quiet"], expected_exit=0)

    writes = [request for request in hub_standin.requests if request.route in WRITE_ROUTES]
    assert writes and all(request.authorization == f"Bearer {HUB_TOKEN}" for request in writes)


def test_missing_token_stops_before_merge(hub_standin, tmp_path, llama_base, llama_fine_tunes, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--push-to-hub", TARGET_REPO], expected_exit=5)

    assert_mentions(message_of(result), r"no Hugging Face token", r"HF_TOKEN", r"hf auth login")
    assert not output.exists()
    assert hub_standin.requests == []


def test_rejected_token_stops_before_merge(hub_standin, tmp_path, llama_base, llama_fine_tunes, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenWrongTokenWrongToken")
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--push-to-hub", TARGET_REPO], expected_exit=5)

    assert_mentions(message_of(result), r"checking the token", r"HTTP 401", r"HF_TOKEN")
    assert "hf_wrongTokenWrongTokenWrongToken" not in result.output
    assert not output.exists()
    assert hub_standin.routes_called() == ["whoami"]


def test_read_only_token_rejected(hub_standin, merged_folder):
    hub_standin.token_role = "read"

    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=5)

    assert_mentions(message_of(result), r"read-only", r"write access")
    assert hub_standin.routes_called() == ["whoami"]


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet-errors", "verbose"])
def test_echoed_token_not_printed(verbose, hub_standin, merged_folder):
    # A server (or proxy) that quotes the request's credentials in its error message.
    hub_standin.fail_next("commit", status=400, message=f"bad request from Bearer {HUB_TOKEN}")

    result = invoke(["upload", merged_folder, TARGET_REPO, *(["--verbose"] if verbose else [])], expected_exit=5)

    assert_mentions(message_of(result), r"HTTP 400", r"Bearer <token>")
    assert_token_hidden(result.output)


def test_unreachable_hub_reported(hub_standin, merged_folder):
    hub_standin.stop()

    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=5)

    assert_mentions(message_of(result), r"checking the token with http://127\.0\.0\.1", r"ConnectError",
                    r"Nothing was uploaded", r"network failed")


def test_offline_mode_rejected(hub_standin, merged_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    result = invoke(["upload", merged_folder, TARGET_REPO], expected_exit=5)

    assert_mentions(message_of(result), r"HF_HUB_OFFLINE")
    assert hub_standin.requests == []


def test_console_script_upload(hub_standin, merged_folder):
    """The installed `merge` script, in a subprocess that reads HF_ENDPOINT and HF_TOKEN at start-up."""
    script = Path(sys.executable).parent / "merge"
    completed = subprocess.run([script, "upload", merged_folder, TARGET_REPO], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "COLUMNS": "500"})

    assert completed.returncode == 0, completed.stderr
    assert "README.md" in hub_standin.repos[TARGET_REPO].files()
    assert_token_hidden(completed.stdout + completed.stderr)


# Checks before the first request


@pytest.mark.parametrize("repo_id", ["tiny-merge", "my-org/tiny--merge", "my-org/a/b", "./my-org/merge"])
def test_invalid_repo_id_rejected(repo_id, hub_standin, merged_folder):
    result = invoke(["upload", merged_folder, repo_id], expected_exit=1)

    assert_mentions(message_of(result), re.escape(repo_id))
    assert hub_standin.requests == []


@pytest.mark.parametrize("revision", ["0123456789abcdef0123456789abcdef01234567", "refs/pr/1"])
def test_revision_must_be_branch(revision, hub_standin, merged_folder):
    result = invoke(["upload", merged_folder, TARGET_REPO, "--revision", revision], expected_exit=1)

    assert_mentions(message_of(result), r"not a branch name")
    assert hub_standin.requests == []


def test_hub_options_need_push(tmp_path, llama_base, llama_fine_tunes):
    output = tmp_path / "merged"
    recipe = write_recipe(tmp_path, ties_recipe(llama_base, llama_fine_tunes, output))

    result = invoke(["run", recipe, "--private"], expected_exit=1)

    assert_mentions(message_of(result), r"--push-to-hub")
    assert not output.exists()


def test_truncated_shard_uploads_nothing(hub_standin, merged_folder, tmp_path):
    folder = copy_folder(merged_folder, tmp_path / "merged")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-5])

    result = invoke(["upload", folder, TARGET_REPO], expected_exit=2)

    assert_mentions(message_of(result), r"not a complete checkpoint", shard.name, r"truncated")
    assert not [route for route in hub_standin.routes_called() if route in WRITE_ROUTES]


def test_unfinished_merge_folder_rejected(hub_standin, merged_folder, tmp_path):
    folder = copy_folder(merged_folder, tmp_path / ".merged.partial-12345")

    result = invoke(["upload", folder, TARGET_REPO], expected_exit=2)

    assert_mentions(message_of(result), r"unfinished or interrupted merge")
    assert not [route for route in hub_standin.routes_called() if route in WRITE_ROUTES]


def test_invalid_card_uploads_nothing(hub_standin, merged_folder, tmp_path):
    folder = copy_folder(merged_folder, tmp_path / "merged")
    card = (folder / "README.md").read_text()
    # mergekit writes local paths into base_model; the Hub reads every entry as a repo id.
    (folder / "README.md").write_text(card.replace("---\n", f"---\nbase_model:\n- {folder}\n", 1))

    result = invoke(["upload", folder, TARGET_REPO], expected_exit=2)

    assert_mentions(message_of(result), r"base_model lists", r"nothing was uploaded")
    assert not [route for route in hub_standin.routes_called() if route in WRITE_ROUTES]



def test_folder_checked_before_token(hub_standin, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")

    result = invoke(["upload", tmp_path / "not-a-merge", TARGET_REPO], expected_exit=2)

    assert "not-a-merge" in message_of(result)
    assert hub_standin.requests == []
