"""A local HTTP stand-in for the Hub endpoints that ``huggingface_hub``'s uploads and downloads call.

Tests point the real client at it (``HfApi(endpoint=standin.endpoint)`` or ``HF_ENDPOINT``), so what runs is
``huggingface_hub``'s own code (``create_repo``, ``upload_folder`` through Xet's pipeline or the classic
preupload + LFS + commit path, ``hf_hub_download``), and the stand-in records what arrived: the repositories with
their files as bytes, every request, and the commits. Endpoints (read from huggingface_hub 2.4's ``hf_api.py``,
``_commit_api.py``, ``lfs.py`` and ``file_download.py``):

==========================================================  =========================================================
``POST /api/repos/create``                                  create_repo: ``{name, organization, visibility, type}``
``POST /api/validate-yaml``                                 the card's metadata, checked before any upload
``POST /api/models/{repo}/preupload/{rev}``                 each file's upload mode: ``regular`` or ``lfs``
``POST /{repo}.git/info/lfs/objects/batch``                 LFS batch: upload (and verify) URLs for new objects
``PUT /_lfs/{oid}``, ``POST /_lfs/{oid}/verify``            the LFS object store (the client sends no token here)
``POST /api/models/{repo}/commit/{rev}``                    NDJSON: header, file (base64), lfsFile, deletedFile...
``POST /api/models/{repo}/branch/{branch}``                 create_branch
``GET /api/models/{repo}[/revision/{rev}]``                 repo_info / model_info, with the file list
``GET /api/models/{repo}/tree/{rev}[/{path}]``              list_repo_tree (one folder; ``recursive=true``: all)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   file metadata and content (hf_hub_download)
==========================================================  =========================================================

With ``lfs=True`` (default) the weights, pictures and files of 10 MiB or more are LFS files, as on the Hub; the
client can only upload those through the LFS batch API, so such tests disable Xet
(``huggingface_hub.constants.HF_HUB_DISABLE_XET``); the stand-in has no Xet storage. With ``lfs=False`` every
file is a regular one, which the Xet-enabled client's pipelined upload commits without Xet storage.
``tokens``: when given, a request without one of them as ``Authorization: Bearer`` gets the Hub's 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.model")
LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Snapshot:
    """The files of one commit: path -> bytes, and which of them are LFS files."""

    files: dict[str, bytes] = field(default_factory=dict)
    lfs: frozenset[str] = frozenset()

    def oid(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_sha1(data)


_EMPTY_COMMIT = hashlib.sha1(b"initial commit").hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    heads: dict[str, str] = field(default_factory=lambda: {"main": _EMPTY_COMMIT})  # branch -> commit oid
    snapshots: dict[str, Snapshot] = field(default_factory=lambda: {_EMPTY_COMMIT: Snapshot()})  # oid -> files
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"oid", "branch", "summary", "files"}

    @property
    def files(self) -> dict[str, bytes]:
        """The files on ``main``: path -> bytes."""
        return self.snapshots[self.heads["main"]].files

    def at(self, rev: str) -> tuple[str, Snapshot] | None:
        """The commit oid and files of ``rev``, a branch or a commit oid."""
        oid = self.heads.get(rev, rev)
        return (oid, self.snapshots[oid]) if oid in self.snapshots else None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class HubStandIn:
    """``with HubStandIn() as hub: ... hub.endpoint ... hub.repos["me/x"].files``; see the module docstring."""

    def __init__(self, user: str = "standin-user", tokens: set[str] | None = None, lfs: bool = True):
        self.user = user
        self.tokens = tokens
        self.lfs = lfs
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (kept after stop(), for assertions on the URLs it handed out)."""
        assert self._endpoint is not None, "start() the stand-in first"
        return self._endpoint

    # -- behaviour ---------------------------------------------------------------------------------------------
    def upload_mode(self, path: str, size: int) -> str:
        if not self.lfs:
            return "regular"
        name = path.rsplit("/", 1)[-1]
        return "lfs" if size >= LFS_THRESHOLD or any(fnmatchcase(name, p) for p in LFS_PATTERNS) else "regular"


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep the test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), content_type)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        hub = self.hub
        with hub.lock:
            hub.requests.append(Request(self.command, url.path, {k.lower(): v for k, v in self.headers.items()}))
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            if not (self.command == "PUT" and path.startswith("/_lfs/")):  # presigned, like S3: no token
                self._check_token()
            with hub.lock:
                self._route(path, query, body)
        except _Error as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers=headers)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    def _check_token(self) -> None:
        if self.hub.tokens is None:
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in self.hub.tokens:
            raise _Error(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _Error(404, "Repository not found", "RepoNotFound")
        return repo

    def _branch(self, repo: Repo, rev: str) -> str:
        """A branch to write to."""
        if rev not in repo.heads:
            raise _Error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return rev

    def _snapshot(self, repo: Repo, rev: str) -> tuple[str, Snapshot]:
        """What to read: a branch or a commit oid."""
        found = repo.at(rev)
        if found is None:
            raise _Error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return found

    # -- routes ------------------------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        m, c = self.command, _match
        if m == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if m == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if m == "POST" and (g := c(r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", path)):
            return self._preupload(g["repo"], g["rev"], json.loads(body), query)
        if m == "POST" and (g := c(r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", path)):
            return self._commit(g["repo"], g["rev"], body, query)
        if m == "POST" and (g := c(r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", path)):
            return self._create_branch(g["repo"], g["branch"], json.loads(body or b"{}"))
        if m == "POST" and (g := c(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", path)):
            return self._lfs_batch(g["repo"], json.loads(body))
        if m == "PUT" and (g := c(r"/_lfs/(?P<oid>[0-9a-f]{64})", path)):
            return self._lfs_put(g["oid"], body)
        if m == "POST" and (g := c(r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", path)):
            return self._lfs_verify(g["oid"], json.loads(body))
        if m == "GET" and (g := c(r"/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>.+))?", path)):
            return self._repo_info(g["repo"], g["rev"] or "main")
        if m == "GET" and (g := c(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)):
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._tree(g["repo"], g["rev"], g["sub"] or "", recursive)
        if m in ("GET", "HEAD") and (g := c(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)):
            return self._resolve(g["repo"], g["rev"], g["file"])
        self.hub.unhandled.append(f"{m} {path}")
        raise _Error(404, f"stand-in: no route for {m} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        if payload.get("type") not in (None, "model"):
            raise _Error(400, "the stand-in only hosts model repositories")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            raise _Error(409, "You already created this model repo", url=url)  # the Hub sends the url too
        self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        text = payload.get("content", "")
        if not text.startswith("---"):
            return self._json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        end = text.find("\n---", 3)
        try:
            metadata = yaml.safe_load(text[3:end] if end >= 0 else "")
        except yaml.YAMLError as err:
            return self._json({"errors": [{"message": str(err)}]}, status=400)
        if not isinstance(metadata, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}]}, status=400)
        self._json({"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, rev: str, payload: dict[str, Any], query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        head, snap = self._snapshot(repo, self._branch(repo, rev))
        files = []
        for f in payload["files"]:
            mode = self.hub.upload_mode(f["path"], f["size"])
            exists = f["path"] in snap.files
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                          "oid": snap.oid(f["path"]) if exists else None})
        self._json({"files": files, "commitOid": head})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        self._repo(repo_id)
        if payload.get("operation") != "upload":
            raise _Error(400, "the stand-in only takes LFS uploads")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                base = f"{self.hub.endpoint}/_lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": base}, "verify": {"href": f"{base}/verify"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Error(400, "the uploaded bytes do not match the LFS oid")
        self.hub.lfs_objects[oid] = body
        self._send(200)

    def _lfs_verify(self, oid: str, payload: dict[str, Any]) -> None:
        data = self.hub.lfs_objects.get(oid)
        if data is None or len(data) != payload.get("size"):
            raise _Error(404, f"LFS object {oid} not found")
        self._json({})

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        if query.get("create_pr"):
            raise _Error(400, "the stand-in does not open pull requests")
        branch = self._branch(repo, rev)
        parent, snap = self._snapshot(repo, branch)
        files, lfs_paths = dict(snap.files), set(snap.lfs)
        header, changed = {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
                changed.append(value["path"])
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise _Error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = data
                lfs_paths.add(value["path"])
                changed.append(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _Error(404, "A file with this name doesn't exist", "EntryNotFound")
                lfs_paths.discard(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    files.pop(p)
                    lfs_paths.discard(p)
            else:
                raise _Error(400, f"the stand-in does not handle commit operation {key!r}")
        oid = hashlib.sha1(parent.encode() + body).hexdigest()
        repo.snapshots[oid] = Snapshot(files, frozenset(lfs_paths))
        repo.heads[branch] = oid
        repo.commits.append({"oid": oid, "branch": branch, "summary": header.get("summary"), "files": changed})
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}",
                    "pullRequestUrl": None})

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> None:
        repo = self._repo(repo_id)
        if branch in repo.heads:
            raise _Error(409, "Reference already exists")
        repo.heads[branch] = self._snapshot(repo, payload.get("startingPoint") or "main")[0]
        self._json({})

    def _repo_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        head, snap = self._snapshot(repo, rev)
        self._json({
            "id": repo_id, "modelId": repo_id, "sha": head, "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(snap.files)],
        })

    def _tree(self, repo_id: str, rev: str, sub: str, recursive: bool = False) -> None:
        """One folder's entries, or with ``recursive`` (``?recursive=true``, what ``snapshot_download`` asks) every
        file below it and every folder on the way."""
        _, snap = self._snapshot(self._repo(repo_id), rev)
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, folders = [], set()
        for p in sorted(snap.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest:
                parts = rest.split("/")[:-1]
                for depth in range(1, len(parts) + 1 if recursive else 2):
                    folders.add(prefix + "/".join(parts[:depth]))
                if not recursive:
                    continue
            entries.append({"type": "file", "path": p, "size": len(snap.files[p]), "oid": snap.oid(p)})
        if prefix and not entries and not folders:
            raise _Error(404, f"{sub} does not exist on {rev}", "EntryNotFound")
        self._json(entries + [{"type": "directory", "path": f, "oid": git_blob_sha1(f.encode())}
                              for f in sorted(folders)])

    def _resolve(self, repo_id: str, rev: str, file: str) -> None:
        head, snap = self._snapshot(self._repo(repo_id), rev)
        data = snap.files.get(file)
        if data is None:
            raise _Error(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": head, "ETag": f'"{git_blob_sha1(data)}"'}
        if file in snap.lfs:
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        self._send(200, data, content_type="application/octet-stream", headers=headers)


def _match(pattern: str, path: str) -> dict[str, str] | None:
    m = re.fullmatch(pattern, path)
    return m.groupdict() if m else None
