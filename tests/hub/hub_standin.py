"""A stand-in for the Hugging Face Hub's write API, served on 127.0.0.1 for the upload tests.

It implements the endpoints that `huggingface_hub` 2.4 calls to publish a folder, with the request
and response shapes that client sends and parses:

- `GET /api/whoami-v2`: the token's user and role;
- `POST /api/repos/create`: a new repo whose initial commit contains `.gitattributes`, or 409;
- `GET /api/models/{repo}` and `.../revision/{rev}`: repo info with the branch's commit (`sha`);
- `POST /api/validate-yaml`: the model card's front matter, checked before any file is sent;
- `POST /api/models/{repo}/branch/{branch}`: a branch from `main`, or 409;
- `POST /api/models/{repo}/preupload/{rev}`: returns "regular" for every file, so the commit carries
  every file inline, and the `oid` of each file the branch already contains, so the client skips it;
- `POST /api/models/{repo}/commit/{rev}`: the NDJSON commit; its `commitUrl` is on this server,
  because the client rejects a commit URL outside its endpoint.

Requests for repos it does not have return 404 with `X-Error-Code: RepoNotFound`, as the Hub
does. Every request is recorded with its Authorization header, and `fail_next` makes the next
request to one route fail, for the tests of the error path. Request bodies are capped at `MAX_BODY_BYTES`, and each connection times
out after `REQUEST_TIMEOUT_S`, so a stuck test fails instead of hanging.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

MAX_BODY_BYTES = 64 * 2**20
REQUEST_TIMEOUT_S = 10
USER_NAME = "ci-bot"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

# The same rule as huggingface_hub's repo id validation: an optional namespace, then a name.
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")
_FRONT_MATTER = re.compile(r"^\s*---\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", re.DOTALL)
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("GET", "whoami", re.compile(r"^/api/whoami-v2$")),
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate-yaml", re.compile(r"^/api/validate-yaml$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
]


def git_blob_oid(content: bytes) -> str:
    """Return the git blob id of `content`: the id the Hub reports for a file stored without LFS."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str
    route: str | None
    authorization: str | None
    body: bytes


@dataclass
class StoredCommit:
    """One commit: the files it sent, and every file of the branch after it."""

    oid: str
    parent: str | None
    branch: str
    summary: str
    description: str
    added: dict[str, bytes]
    files: dict[str, bytes]


@dataclass
class StoredRepo:
    """A model repo: its visibility, branches and commits, oldest first."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: list[StoredCommit] = field(default_factory=list)

    def commit(self, oid: str) -> StoredCommit:
        return next(commit for commit in self.commits if commit.oid == oid)

    def files(self, branch: str = "main") -> dict[str, bytes]:
        """Return every file of `branch` at its newest commit."""
        return dict(self.commit(self.branches[branch]).files)

    def add_commit(self, branch: str, summary: str, description: str, added: dict[str, bytes],
                   deleted: set[str]) -> StoredCommit:
        parent = self.branches.get(branch)
        files = dict(self.commit(parent).files) if parent else {}
        for path in deleted:
            files.pop(path, None)
        files.update(added)
        digest = hashlib.sha1(f"{parent}\0{branch}\0{summary}\0{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\0".encode())
        commit = StoredCommit(digest.hexdigest(), parent, branch, summary, description, dict(added), files)
        self.commits.append(commit)
        self.branches[branch] = commit.oid
        return commit


class _HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class HubStandIn:
    """The stand-in server. Start it with `start()`, point `HfApi(endpoint=...)` at `url`, then `stop()`.

    `token` is the only token it accepts. `token_role` is the role `whoami-v2` reports for it
    ("write" or "read"); a read token may not create repos or commit.
    """

    def __init__(self, *, token: str, token_role: str = "write") -> None:
        self.token = token
        self.token_role = token_role
        self.repos: dict[str, StoredRepo] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Life cycle

    @property
    def url(self) -> str:
        assert self._server is not None, "the stand-in is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        handler = type("_BoundHandler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval lets `stop` return quickly: shutdown waits for the serving loop's next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S)
        self._server = None
        self._thread = None

    # What tests set up and inspect

    def fail_next(self, route: str, *, status: int, message: str) -> None:
        """Make the next request to `route` (see `_ROUTES`) fail with `status` and `message`."""
        with self._lock:
            self._failures.setdefault(route, []).append((status, message))

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> StoredRepo:
        """Create a repo whose `main` already contains `files`, as an earlier upload would leave it."""
        with self._lock:
            repo = self._create(repo_id, private=private)
            repo.add_commit("main", "earlier upload", "", dict(files), set())
            return repo

    def routes_called(self) -> list[str]:
        """Return the route of every request, in order; `None` marks a request no route matched."""
        with self._lock:
            return [request.route for request in self.requests]

    # Request handling

    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> tuple[int, dict[str, str], bytes]:
        route, match = _match_route(method, path)
        with self._lock:
            self.requests.append(RecordedRequest(method, path, route, authorization, body))
            try:
                if route is None:
                    raise _HttpError(404, f"the stand-in has no endpoint {method} {path}")
                failures = self._failures.get(route)
                if failures:
                    status, message = failures.pop(0)
                    raise _HttpError(status, message)
                handler = getattr(self, "_route_" + route.replace("-", "_"))
                return _json_response(200, handler(match.groupdict(), authorization, body))
            except _HttpError as error:
                headers = {"X-Error-Message": error.message}
                if error.error_code:
                    headers["X-Error-Code"] = error.error_code
                return _json_response(error.status, {"error": error.message}, headers)

    def _authorize(self, authorization: str | None, *, write: bool) -> None:
        if authorization != f"Bearer {self.token}":
            raise _HttpError(401, "Invalid credentials in Authorization header")
        if write and self.token_role != "write":
            raise _HttpError(403, "this token is read-only")

    def _repo(self, repo_id: str, authorization: str | None) -> StoredRepo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and authorization != f"Bearer {self.token}"):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _branch_head(self, repo: StoredRepo, revision: str) -> StoredCommit:
        if revision not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commit(repo.branches[revision])

    def _create(self, repo_id: str, *, private: bool) -> StoredRepo:
        repo = StoredRepo(repo_id, private)
        repo.add_commit("main", "initial commit", "", {".gitattributes": GITATTRIBUTES}, set())
        self.repos[repo_id] = repo
        return repo

    def _route_whoami(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        self._authorize(authorization, write=False)
        return {"type": "user", "name": USER_NAME, "orgs": [{"name": "my-org"}],
                "auth": {"type": "access_token", "accessToken": {"displayName": "ci", "role": self.token_role}}}

    def _create_repo(self, payload: dict[str, Any]) -> StoredRepo:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"{USER_NAME}/{repo_id}"
        if not _REPO_ID.match(repo_id):
            raise _HttpError(400, f"invalid repo name {repo_id!r}")
        if repo_id in self.repos:
            raise _HttpError(409, "You already created this model repo")
        private = payload.get("visibility") == "private" or payload.get("private") is True
        return self._create(repo_id, private=private)

    def _route_create(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        self._authorize(authorization, write=True)
        repo = self._create_repo(json.loads(body))
        return {"url": f"{self.url}/{repo.repo_id}", "name": repo.repo_id}

    def _route_info(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        repo = self._repo(groups["repo"], authorization)
        head = self._branch_head(repo, unquote(groups["rev"] or "main"))
        return {"id": repo.repo_id, "sha": head.oid, "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(head.files)]}

    def _route_validate_yaml(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        errors = _front_matter_errors(json.loads(body).get("content", ""))
        if errors:
            raise _HttpError(400, "; ".join(errors))
        return {"errors": [], "warnings": []}

    def _route_branch(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        self._authorize(authorization, write=True)
        repo = self._repo(groups["repo"], authorization)
        branch = unquote(groups["rev"])
        if branch in repo.branches:
            raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = self._branch_head(repo, starting_point).oid
        return {}

    def _route_preupload(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        self._authorize(authorization, write=True)
        repo = self._repo(groups["repo"], authorization)
        head = self._branch_head(repo, unquote(groups["rev"]))
        files = []
        for entry in json.loads(body)["files"]:
            stored = head.files.get(entry["path"])
            files.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(stored) if stored is not None else None})
        return {"files": files, "commitOid": head.oid}

    def _route_commit(self, groups: dict, authorization: str | None, body: bytes) -> dict[str, Any]:
        self._authorize(authorization, write=True)
        repo = self._repo(groups["repo"], authorization)
        branch = unquote(groups["rev"])
        head = self._branch_head(repo, branch)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "the commit body must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise _HttpError(412, "the branch moved: parentCommit is not its head")
        added: dict[str, bytes] = {}
        deleted: set[str] = set()
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.add(value["path"])
            else:
                raise _HttpError(400, f"the stand-in only takes inline files and deletions, not {key!r}")
        readme = added.get("README.md")
        if readme is not None:
            errors = _front_matter_errors(readme.decode("utf-8"))
            if errors:
                raise _HttpError(400, "invalid README.md metadata: " + "; ".join(errors))
        commit = repo.add_commit(branch, header.get("summary", ""), header.get("description", ""), added, deleted)
        return {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
                "hookOutput": ""}


def _match_route(method: str, path: str) -> tuple[str | None, re.Match | None]:
    for route_method, name, pattern in _ROUTES:
        match = pattern.match(path)
        if match and route_method == method:
            return name, match
    return None, None


def _front_matter_errors(content: str) -> list[str]:
    """Check a card's front matter as the Hub does for the keys the upload writes."""
    match = _FRONT_MATTER.match(content)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"the front matter is not valid YAML: {error}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["the front matter is not a mapping"]
    errors = []
    base_models = data.get("base_model")
    if base_models is not None:
        for entry in base_models if isinstance(base_models, list) else [base_models]:
            if not isinstance(entry, str) or not _REPO_ID.match(entry):
                errors.append(f"base_model: {entry!r} is not a model id")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
        errors.append("tags must be a list of strings")
    return errors


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    standin: HubStandIn
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, {"Content-Type": "application/json", "Connection": "close"},
                       json.dumps({"error": f"request body over {MAX_BODY_BYTES} bytes"}).encode())
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        status, headers, payload = self.standin.handle(method, path, self.headers.get("Authorization"), body)
        self._send(status, headers, payload if method != "HEAD" else b"")

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # Requests are recorded in `HubStandIn.requests`; stderr stays clean for the test output.
        pass
