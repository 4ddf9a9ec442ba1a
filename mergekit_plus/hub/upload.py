"""Publishing a merge output folder to a Hugging Face Hub model repo in one commit.

`open_session` runs before any merge work: it checks the target, offline mode and the token, so a
long merge does not end in an upload that could never start. `upload_folder` then works in steps:

1. Check the folder locally: complete weights, and a card that describes its recipe copy. A folder
   that fails here sends nothing.
2. Create the repo, or reuse it when it exists.
3. Create the branch from `main` when `--revision` names one that does not exist.
4. Commit every file at once. The client asks the Hub how to send each file (inline, or as a large
   file through the Hub's storage) and leaves out files whose content the branch already contains.

A commit is all or nothing, so after a failure the repo contains either every file or none of this
upload's. Running the same upload again reuses the repo and branch and sends only what changed.
The token is read by huggingface_hub (HF_TOKEN, then the login cache) and is never logged: error
messages from the Hub pass through `redact` before they are shown.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_plus import __version__
from mergekit_plus.errors import HubError, InputError, MergeError
from mergekit_plus.hub.card import PreparedCard, prepare_card
from mergekit_plus.hub.errors import describe, hint_for, redact, request_failures, status_of
from mergekit_plus.io.sidefiles import CARD_FILE_NAME
from mergekit_plus.sizes import format_size

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_STAGING_NAME = re.compile(r"\..+\.(partial|replaced)-\d+")
_READ_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class HubTarget:
    """The destination of an upload: a model repo `namespace/name`, a branch, and the visibility of a new repo."""

    repo_id: str
    revision: str | None = None
    private: bool = False

    @property
    def branch(self) -> str:
        return self.revision or DEFAULT_BRANCH

    def check(self) -> None:
        """Raise MergeError (exit code 1) for a repo id or branch that no upload could use."""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if self.repo_id.count("/") != 1:
            raise MergeError(f"Hub repo {self.repo_id!r} must be written as namespace/name",
                             hint="name the user or organization that owns it, for example my-org/my-merge")
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as exc:
            raise MergeError(f"invalid Hub repo id {self.repo_id!r}: {exc}",
                             hint="use letters, digits, '-', '_' and '.' in both parts") from exc
        if self.revision is not None:
            if _COMMIT_HASH.fullmatch(self.revision) or self.revision.startswith("refs/"):
                raise MergeError(f"--revision {self.revision!r} is not a branch name; commits go to a branch",
                                 hint="give a branch name such as `main` or `experiments`; a missing one is created")
            if not self.revision.strip() or ".." in self.revision or self.revision.startswith("/"):
                raise MergeError(f"--revision {self.revision!r} is not a valid branch name",
                                 hint="give a branch name such as `main` or `experiments`")


@dataclass(frozen=True)
class HubSession:
    """A client with a token that the Hub accepted, and the user it belongs to."""

    api: Any
    user: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class FileRecord:
    """One file of the folder: its path in the repo, its size and its SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadResult:
    """The state of the Hub after an upload. `commit` is the branch's head, whether or not this upload made it."""

    repo_id: str
    branch: str
    repo_url: str
    created_repo: bool
    created_branch: bool
    commit: str
    commit_url: str | None
    committed: tuple[str, ...]
    unchanged: tuple[str, ...]
    card_added: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "branch": self.branch, "repo_url": self.repo_url,
                "created_repo": self.created_repo, "created_branch": self.created_branch, "commit": self.commit,
                "commit_url": self.commit_url, "committed": list(self.committed), "unchanged": list(self.unchanged),
                "card_added": list(self.card_added)}


def open_session(target: HubTarget, *, endpoint: str | None = None) -> HubSession:
    """Check the target, offline mode and the token, and return a client for the upload.

    `endpoint` defaults to huggingface_hub's (HF_ENDPOINT, else https://huggingface.co). Raise
    MergeError for an invalid target and HubError when no upload can start: offline mode, no
    token, a token the Hub rejects or a read-only one, or a Hub that cannot be reached.
    """
    from huggingface_hub import HfApi, constants, get_token

    target.check()
    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be sent to the Hub",
                       hint="unset HF_HUB_OFFLINE (or set it to 0) for a run that uploads")
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token found: HF_TOKEN is not set and there is no login cache",
                       hint="set HF_TOKEN to a token with write access (in CI, from a secret), or run `hf auth login`")

    api = HfApi(endpoint=endpoint, token=token, library_name="mergekit_plus", library_version=__version__)
    try:
        identity = api.whoami()
    except request_failures() as exc:
        raise _request_error(f"checking the token with {api.endpoint} failed: {describe(exc, token=token)}. "
                             "Nothing was uploaded.", exc, token=token,
                             hint=hint_for(exc, repo_id=target.repo_id))
    role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError("the Hugging Face token is read-only, so it cannot create repos or commit",
                       hint="use a token with write access (a write token, or a fine-grained one with write permission)")
    user = identity.get("name") or "unknown user"
    logger.info("the Hub at %s accepted the token of %s", api.endpoint, user)
    return HubSession(api=api, user=user, token=token)


def check_upload_folder(folder: Path) -> tuple[list[tuple[str, Path]], Any]:
    """Check a merge output folder for upload without any request: its files, weights and model card.

    Returns the files to upload and the prepared card. Raise InputError when the folder is not a
    complete merge output or its card is invalid.
    """
    files = collect_files(folder)
    _check_weights(folder)
    return files, prepare_card(folder)


def upload_folder(folder: Path, target: HubTarget, *, session: HubSession) -> UploadResult:
    """Publish a merge output folder to `target` in one commit. See the module docstring for the steps.

    Raise InputError (nothing sent) when the folder is not a complete merge output or its card is
    invalid, and HubError when a request fails, stating what the Hub contains at that point.
    """
    from huggingface_hub import CommitOperationAdd

    # 1. Everything that can be checked locally, before the first request.
    files, card = check_upload_folder(folder)
    if card.added:
        logger.info("model card: added %s to the front matter", "; ".join(card.added))
    api, token = session.api, session.token
    total = sum(path.stat().st_size for _, path in files)

    # 2. The repo.
    try:
        created_repo = _ensure_repo(api, target)
    except request_failures() as exc:
        raise _step_failed("creating the repo", exc, target, token, "Nothing was uploaded.")
    repo_state = ("was created by this upload but contains none of its files" if created_repo
                  else "already existed and was not changed")
    logger.info("%s %s", "created the repo" if created_repo else "reusing the repo", target.repo_id)

    # 3. The branch.
    try:
        created_branch = _ensure_branch(api, target)
    except request_failures() as exc:
        raise _step_failed(f"creating the branch {target.branch}", exc, target, token,
                           f"The repo {target.repo_id} {repo_state}; nothing was committed.")

    # 4. One commit with every file. The card goes up as prepared, which may differ from README.md.
    operations = [
        CommitOperationAdd(path_in_repo=name,
                           path_or_fileobj=card.text.encode("utf-8") if name == CARD_FILE_NAME else path)
        for name, path in files
    ]
    logger.info("committing %d files (%s) to %s on branch %s", len(files), format_size(total), target.repo_id,
                target.branch)
    try:
        info = api.create_commit(target.repo_id, operations, revision=target.branch,
                                 commit_message=f"Upload {card.method} merge (mergekit_plus {__version__})",
                                 commit_description=f"Recipe sha256: {card.recipe_sha256}")
    except (*request_failures(), ValueError) as exc:
        state = (f"The repo {target.repo_id} {repo_state}; none of the {len(files)} files was committed "
                 f"to {target.branch}.")
        raise _step_failed("committing the files", exc, target, token, state)

    unchanged = tuple(operation.path_in_repo for operation in operations if _was_unchanged(operation))
    committed = tuple(name for name, _ in files if name not in unchanged)
    if committed:
        logger.info("committed %d files (%d unchanged): %s", len(committed), len(unchanged), info.commit_url)
    else:
        logger.info("no commit was made: the branch %s already contains every file", target.branch)
    return UploadResult(repo_id=target.repo_id, branch=target.branch, repo_url=f"{api.endpoint}/{target.repo_id}",
                        created_repo=created_repo, created_branch=created_branch, commit=info.oid,
                        commit_url=info.commit_url, committed=committed, unchanged=unchanged, card_added=card.added)


def collect_files(folder: Path) -> list[tuple[str, Path]]:
    """Return (path in the repo, local path) for every file under `folder`, sorted, leaving out hidden ones.

    Hidden paths (`.cache/` from `hf download --local-dir`, `.git/`) are tools' state, not the model.
    Raise InputError when `folder` is not a folder or is the staging folder of an unfinished merge.
    """
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", hint="give the output folder that `merge run` wrote")
    if _STAGING_NAME.fullmatch(folder.name):
        raise InputError(f"{folder} is the temporary folder of an unfinished or interrupted merge",
                         hint="run `merge run` again and upload the output folder it names")
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append((relative.as_posix(), path))
    if not files:
        raise InputError(f"{folder} is empty", hint="give the output folder that `merge run` wrote")
    return files


def file_records(folder: Path) -> list[FileRecord]:
    """Return the size and SHA-256 of every file `upload_folder` would send, for summaries and reproducibility checks."""
    records = []
    for name, path in collect_files(folder):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK_BYTES):
                digest.update(chunk)
        records.append(FileRecord(name, path.stat().st_size, digest.hexdigest()))
    return records


def _check_weights(folder: Path) -> None:
    from mergekit_plus.io.reader import CheckpointReader
    from mergekit_plus.io.sources import ModelSource

    try:
        CheckpointReader(ModelSource(reference=str(folder), folder=folder))
    except InputError as exc:
        # The reader names the folder as a recipe input ("model FOLDER: ..."); the message names it already.
        detail = exc.message.removeprefix(f"model {folder}: ")
        raise InputError(f"{folder} is not a complete checkpoint: {detail}",
                         hint="run `merge run` again to rewrite the folder; nothing was uploaded") from exc


def _ensure_repo(api: Any, target: HubTarget) -> bool:
    """Create the repo, or check that the existing one can take the upload. Return True when created."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(target.repo_id, private=True if target.private else None)
        return True
    except HfHubHTTPError as exc:
        # 409: the repo exists. 403: the token may not create repos in this namespace, but a
        # fine-grained token may still write to an existing repo there.
        if status_of(exc) not in (409, 403):
            raise
        creation_error = exc
    if status_of(creation_error) == 403 or target.private:
        try:
            info = api.repo_info(target.repo_id)
        except HfHubHTTPError:
            raise creation_error from None
        if target.private and not info.private:
            raise HubError(f"the repo {target.repo_id} already exists and is public; --private only sets the "
                           "visibility of a repo that the upload creates. Nothing was uploaded.",
                           hint="drop --private, or make the repo private in its settings on the Hub first")
    return False


def _ensure_branch(api: Any, target: HubTarget) -> bool:
    """Create `target.branch` from `main` unless it is `main` or exists. Return True when created."""
    from huggingface_hub.errors import HfHubHTTPError

    if target.branch == DEFAULT_BRANCH:
        return False
    try:
        api.create_branch(target.repo_id, branch=target.branch)
    except HfHubHTTPError as exc:
        if status_of(exc) == 409:
            return False
        raise
    logger.info("created the branch %s from %s", target.branch, DEFAULT_BRANCH)
    return True


def _was_unchanged(operation: Any) -> bool:
    """Tell whether the client left a file out of the commit because the branch already has the same content."""
    # NOTE: create_commit records the comparison only in private attributes (checked with
    # huggingface_hub 2.4). Without them every file counts as committed, which misreports only the summary.
    remote = getattr(operation, "_remote_oid", None)
    return remote is not None and remote == getattr(operation, "_local_oid", None)


def _step_failed(step: str, error: BaseException, target: HubTarget, token: str, state: str) -> HubError:
    message = (f"upload to {target.repo_id} (branch {target.branch}) failed while {step}: "
               f"{describe(error, token=token)}. {state}")
    hint = (hint_for(error, repo_id=target.repo_id)
            + " (a retry reuses the repo and sends only the files that the branch does not already contain)")
    return _request_error(message, error, token=token, hint=hint)


def _request_error(message: str, error: BaseException, *, token: str, hint: str) -> HubError:
    """Build the HubError for a failed request, keeping the client's exception unless it quotes the token."""
    failure = HubError(redact(message, token), hint=hint)
    # With --verbose the CLI prints the traceback, chained exceptions included, so the client's
    # exception is chained only when its text cannot show the token.
    failure.__cause__ = error if token not in str(error) else None
    failure.__suppress_context__ = True
    return failure
