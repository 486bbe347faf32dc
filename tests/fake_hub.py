"""A loopback fake of the Hugging Face Hub HTTP API, just enough for huggingface_hub 2.4's own client code.

Endpoints served (the ones `whoami`, `create_repo`, `upload_folder` and `snapshot_download` call):
  GET  /api/whoami-v2
  POST /api/validate-yaml                       (upload_folder validates README.md front matter first)
  POST /api/repos/create
  POST /api/models/{ns}/{name}/preupload/{rev}  (every file answered "regular": content goes inline in the commit,
                                                 so neither LFS nor the xet storage protocol is ever needed)
  POST /api/models/{ns}/{name}/commit/{rev}     (ndjson: header / file / deletedFile lines, base64 content)
  GET  /api/models/{ns}/{name}[/revision/{rev}]  and  .../tree/{rev}
  HEAD/GET /{ns}/{name}/resolve/{rev}/{path}

Only the transport is faked: the client code under test runs unchanged against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

# Matches the Hub's answer to a bad token; huggingface_hub keys on this exact text to tell it from "repo not found".
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(content: bytes) -> str:
    """The git blob id, which is what the Hub reports as oid/ETag for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeRepo:
    owner: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    # Every commit's full file map, so downloads pinned to an older sha stay consistent.
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)
    sha: str = "0" * 40


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra or {}


def make_token(user: str) -> str:
    """A token-shaped random string, made per run so no token-like literal sits in the repository."""
    return f"hf_{user}{secrets.token_hex(16)}"


class FakeHub:
    """Start with `with FakeHub({token: "alice"}) as hub:`; point clients at `hub.endpoint`."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})  # token -> user name
        self.repos: dict[str, FakeRepo] = {}
        self.refuse_auth = False  # when set, every token is answered 401 like a revoked one
        self.commit_count = 0  # successful commits, all repos
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.auth_headers_seen: list[str] = []  # raw Authorization values, to check what was (not) sent
        self._failures: list[tuple[int | None, str]] = []  # queued commit failures: (status or None = drop, message)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )  # a short poll keeps shutdown() quick

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False) -> FakeRepo:
        """Create a repo directly (e.g. one owned by another account), bypassing the API."""
        repo = self.repos[repo_id] = FakeRepo(owner=repo_id.split("/")[0], private=private)
        self._commit(repo, dict(files or {}))
        return repo

    def fail_next_commits(self, times: int = 1, status: int | None = 500, message: str = "Simulated failure") -> None:
        """Make the next `times` commit requests fail with `status` and `message` (the server's error text), or
        drop the connection without answering when status is None.

        Note that huggingface_hub retries commits on 5xx and dropped connections (1, 2, 4, 8, 8 s back-off), so a
        failure the client must give up on quickly should use a non-retried status such as 422.
        """
        with self._lock:
            self._failures.extend([(status, message)] * times)

    def clear_failures(self) -> None:
        """Forget the commit failures still queued."""
        with self._lock:
            self._failures.clear()

    # --- request handling (called from server threads) ---

    def _commit(self, repo: FakeRepo, files: dict[str, bytes]) -> str:
        repo.files = files
        repo.sha = hashlib.sha1(f"{repo.sha}{len(repo.history)}{sorted(files)}".encode()).hexdigest()
        repo.history[repo.sha] = dict(files)
        return repo.sha

    def _user(self, headers: Any, required: bool) -> str | None:
        auth = headers.get("Authorization")
        if auth is None:
            if required:
                raise _HttpError(401, "Authentication required")
            return None
        self.auth_headers_seen.append(auth)
        token = auth.removeprefix("Bearer ").strip()
        if self.refuse_auth or token not in self.tokens:
            raise _HttpError(401, INVALID_CREDENTIALS, {"X-Error-Message": INVALID_CREDENTIALS})
        return self.tokens[token]

    def _repo(self, repo_id: str, user: str | None, write: bool) -> FakeRepo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            # Like the Hub: a private repo is indistinguishable from a missing one; 401 when anonymous.
            raise _HttpError(401 if user is None else 404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if write and user != repo.owner:
            raise _HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _revision(self, repo: FakeRepo, rev: str) -> tuple[str, dict[str, bytes]]:
        if rev == "main":
            return repo.sha, repo.files
        if rev in repo.history:
            return rev, repo.history[rev]
        raise _HttpError(404, f"Invalid rev id: {rev}", {"X-Error-Code": "RevisionNotFound"})

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """Return (status, headers, body), or None to drop the connection without answering."""
        with self._lock:
            self.requests.append((method, path))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        api = parts[0] == "api"
        if method == "GET" and parts == ["api", "whoami-v2"]:
            user = self._user(headers, required=True)
            return _json({"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return _json({"errors": [], "warnings": []})
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create(headers, json.loads(body or b"{}"))
        if api and len(parts) >= 4 and parts[1] == "models":
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if method == "POST" and rest[:1] == ["preupload"]:
                repo = self._repo(repo_id, self._user(headers, required=True), write=True)
                return _json({"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_oid(repo.files[f["path"]]) if f["path"] in repo.files else None}
                    for f in json.loads(body)["files"]
                ], "commitOid": repo.sha})
            if method == "POST" and rest[:1] == ["commit"]:
                return self._commit_request(repo_id, headers, body)
            if method == "GET" and rest[:1] in ([], ["revision"]):
                repo = self._repo(repo_id, self._user(headers, required=False), write=False)
                sha, files = self._revision(repo, "/".join(rest[1:]) or "main")
                return _json({"id": repo_id, "author": repo.owner, "sha": sha, "private": repo.private,
                              "siblings": [{"rfilename": p} for p in sorted(files)]})
            if method == "GET" and rest[:1] == ["tree"]:
                repo = self._repo(repo_id, self._user(headers, required=False), write=False)
                _, files = self._revision(repo, rest[1])
                return _json([{"type": "file", "path": p, "size": len(c), "oid": git_blob_oid(c)}
                              for p, c in sorted(files.items())])
        if not api and len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._repo(f"{parts[0]}/{parts[1]}", self._user(headers, required=False), write=False)
            sha, files = self._revision(repo, parts[3])
            name = "/".join(parts[4:])
            if name not in files:
                raise _HttpError(404, "Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            content = files[name]
            return 200, {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": sha,
                         "Content-Type": "application/octet-stream"}, content
        raise _HttpError(404, f"fake hub: no route for {method} {path}")

    def _create(self, headers: Any, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        user = self._user(headers, required=True)
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise _HttpError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                # The client reads "url" from this 409 body when exist_ok=True.
                raise _HttpError(409, "You already created this model repo", extra={"url": url})
            self.add_repo(repo_id, private=payload.get("visibility") == "private")
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _commit_request(self, repo_id: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        repo = self._repo(repo_id, self._user(headers, required=True), write=True)
        with self._lock:
            if self._failures:
                status, message = self._failures.pop(0)
                if status is None:
                    return None
                raise _HttpError(status, message)
            files = dict(repo.files)
            for line in body.splitlines():
                op = json.loads(line)
                value = op["value"]
                if op["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif op["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif op["key"] != "header":
                    raise _HttpError(400, f"fake hub: unsupported commit operation {op['key']!r}")
            sha = self._commit(repo, files)
            self.commit_count += 1
        return _json({"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                      "pullRequestUrl": None, "success": True})


def _json(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real client expects
        disable_nagle_algorithm = True  # headers and body go out in two writes: avoid a 40 ms delayed-ACK stall

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                result = hub.handle(self.command, urlsplit(self.path).path, self.headers, body)
            except _HttpError as err:
                result = (err.status, {"Content-Type": "application/json", **err.headers},
                          json.dumps({"error": err.message, **err.extra}).encode())
            if result is None:
                self.close_connection = True
                return
            status, headers, payload = result
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    return Handler
