"""A loopback Hugging Face Hub server for tests (standard library only).

**This is a test utility, not a Hub.** It serves, on ``127.0.0.1``, the subset of the Hub HTTP
API that the real ``huggingface_hub``, ``transformers`` and ``datasets`` clients use to push and
pull repositories, so tests exercise those clients end to end without network access. There is
no authentication (any token is accepted and none is checked), no pull requests, no Xet, no
rate limits and no persistence: every repository lives in memory and is lost at :meth:`stop`.

Why it exists: no pip-installable, offline, upload-capable Hub server exists, and mocking the
clients tests only their call sites (``huggingface_hub`` 2.x talks HTTP through ``httpx2``, which
``responses``/``respx`` do not intercept anyway).

Usage::

    hub = LoopbackHub().start()
    hub.apply_env(hf_home)  # before huggingface_hub / datasets / transformers are imported
    ...                     # push_to_hub / from_pretrained / load_dataset as usual
    hub.stop()

or as a process (the endpoint is printed and written to ``--port-file``)::

    python -m hf_tae.testing.loopback_hub --port 0 --port-file /tmp/hub-endpoint

Client behaviours the server is shaped around:

* Xet must be off (``HF_HUB_DISABLE_XET=1``, see :meth:`LoopbackHub.env`): otherwise every file
  the server marks ``lfs`` is uploaded through Xet, which this server does not speak. With Xet off
  the client uses the classic LFS batch API and a single "basic" ``PUT`` per object.
* The preupload answer is ``lfs`` for binary extensions (:data:`LFS_EXTENSIONS`) and large files,
  ``regular`` otherwise. ``Dataset.push_to_hub`` deletes its parquet temp files after preuploading
  them, so a ``regular`` answer for a shard makes its final commit fail.
* A missing file or tree path is a 404 with ``X-Error-Code: EntryNotFound`` (and
  ``X-Repo-Commit`` on ``resolve``): clients probe optional files (``adapter_config.json``,
  ``README.md``, ``.huggingface.yaml``...) and glob paths in fresh repos, and treat only that answer
  as "absent". Missing repos and revisions answer ``RepoNotFound`` / ``RevisionNotFound``.
* ``POST /api/validate-yaml`` must exist: every commit that contains a ``README.md`` calls it.
* A commit whose ``parentCommit`` is not the branch head is refused with 412, as on the Hub
  (``datasets`` retries on it).
* Revisions are resolved as branch, tag or full commit sha, so a pinned revision keeps serving the
  old files after newer pushes. Revisions and paths arrive URL-encoded (``quote(rev, safe="")``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["DEFAULT_USER", "DUMMY_TOKEN", "LFS_EXTENSIONS", "LoopbackHub", "main"]

#: Namespace used for repos created without an organization, and the ``whoami`` user.
DEFAULT_USER = "tae-tester"
#: Token exported by :meth:`LoopbackHub.env`. Uploads need *a* token; the server ignores it.
DUMMY_TOKEN = "hf_dummy_loopback_token"
#: Extensions the preupload endpoint answers ``lfs`` for (as the Hub's default ``.gitattributes``).
LFS_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".safetensors", ".parquet", ".bin", ".pt", ".pth", ".npy", ".npz", ".arrow",
        ".msgpack", ".h5", ".ckpt", ".png", ".jpg",
    }
)  # fmt: skip
#: Files at least this large go through LFS whatever their extension (the Hub uses 10 MB too).
LFS_MIN_SIZE = 10 * 1024 * 1024

# Modules that read HF_ENDPOINT (and the cache / offline settings) once, at import time.
_HF_CLIENT_MODULES = ("huggingface_hub", "datasets", "transformers")
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_DEFAULT_BRANCH = "main"


def _now() -> str:
    """Current UTC time in the Hub's date format (``2024-01-31T12:00:00.000Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _git_oid(data: bytes) -> str:
    """Git blob id of ``data`` (what the Hub reports as a file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Blob:
    """File content plus the ids the clients compare (git oid, and sha256 for LFS files)."""

    data: bytes
    lfs: bool
    sha256: str
    oid: str  # git blob id: of the content, or of the LFS pointer file for LFS blobs
    pointer_size: int

    @classmethod
    def of(cls, data: bytes, lfs: bool) -> _Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        if not lfs:
            return cls(data, False, sha256, _git_oid(data), 0)
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        )
        return cls(data, True, sha256, _git_oid(pointer.encode()), len(pointer))

    @property
    def etag(self) -> str:
        """What ``resolve`` sends as ``ETag``: sha256 for LFS files, git oid otherwise."""
        return self.sha256 if self.lfs else self.oid


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit:
        """Commit named by a branch, a tag or a full commit sha (already URL-decoded)."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return self.commits[sha]

    def history(self, sha: str) -> Iterable[_Commit]:
        """Commits from ``sha`` back to the first one, newest first."""
        commit: _Commit | None = self.commits[sha]
        while commit is not None:
            yield commit
            commit = self.commits[commit.parent] if commit.parent else None


class _HubError(Exception):
    """An error answer: status, message and the ``X-Error-Code`` the clients map to exceptions."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] = {}) -> _Response:
    return _Response(
        status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
    )


def _subtree(files: Mapping[str, _Blob], path: str) -> dict[str, str]:
    """``{path: oid}`` of the file ``path`` or of every file under the folder ``path``."""
    prefix = path.rstrip("/") + "/"
    return {p: b.oid for p, b in files.items() if p == path or p.startswith(prefix)}


class _Backend:
    """The in-memory store and the route handlers. Every call runs under :attr:`lock`."""

    def __init__(self, user: str, lfs_extensions: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.user = user
        self.lfs_extensions = frozenset(ext.lower() for ext in lfs_extensions)
        self.endpoint = ""  # set once the socket is bound
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos
        self._counter = itertools.count()

    # ------------------------------------------------------------------ routing
    def route(
        self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes
    ) -> _Response:
        """Dispatch one request; ``segments`` are the raw (still URL-encoded) path segments."""
        match (method, segments):
            case ("GET", ["api", "whoami-v2"]):
                return self._whoami()
            case ("POST", ["api", "repos", "create"]):
                return self._create_repo(_load_json(body))
            case ("DELETE", ["api", "repos", "delete"]):
                return self._delete_repo(_load_json(body))
            case ("POST", ["api", "validate-yaml"]):
                return _json({"errors": [], "warnings": []})
            case (_, ["api", kind, namespace, name, *rest]) if kind in _API_KINDS:
                repo = self._repo(_API_KINDS[kind], f"{unquote(namespace)}/{unquote(name)}")
                return self._repo_api(method, repo, rest, query, body)
            case ("PUT", ["_loopback", "lfs", oid]):
                return self._lfs_put(oid, body)
            case ("POST", ["_loopback", "lfs", oid, "verify"]):
                return self._lfs_verify(oid, _load_json(body))
        repo_type, rest = _split_type_prefix(segments)
        match (method, rest):
            case ("POST", [namespace, git_name, "info", "lfs", "objects", "batch"]) if (
                git_name.endswith(".git")
            ):
                self._repo(
                    repo_type, f"{unquote(namespace)}/{unquote(git_name.removesuffix('.git'))}"
                )
                return self._lfs_batch(_load_json(body))
            case ("GET" | "HEAD", [namespace, name, "resolve", revision, *path]):
                repo = self._repo(repo_type, f"{unquote(namespace)}/{unquote(name)}")
                return self._resolve(repo, unquote(revision), unquote("/".join(path)))
        raise _HubError(404, f"loopback hub: route not implemented: {method} /{'/'.join(segments)}")

    def _repo_api(
        self, method: str, repo: _Repo, rest: list[str], query: dict[str, list[str]], body: bytes
    ) -> _Response:
        match (method, rest):
            case ("GET", []):
                return self._repo_info(repo, repo.resolve(_DEFAULT_BRANCH))
            case ("GET", ["revision", revision]):
                return self._repo_info(repo, repo.resolve(unquote(revision)))
            case ("GET", ["tree", revision, *path]):
                recursive, expand = _flag(query, "recursive"), _flag(query, "expand")
                path_in_repo = unquote("/".join(path))
                return self._tree(repo, unquote(revision), path_in_repo, recursive, expand)
            case ("POST", ["paths-info", revision]):
                return self._paths_info(repo, unquote(revision), body)
            case ("POST", ["preupload", revision]):
                return self._preupload(repo, unquote(revision), _load_json(body))
            case ("POST", ["commit", revision]):
                if _flag(query, "create_pr"):
                    raise _HubError(400, "loopback hub: pull requests are not supported")
                return self._commit(repo, unquote(revision), body)
            case ("GET", ["refs"]):
                return self._refs(repo)
            case ("GET", ["commits", revision]):
                formatted = "formatted" in query.get("expand[]", [])
                return self._commits(repo, unquote(revision), formatted)
            case ("POST", ["branch", branch]):
                return self._create_ref(
                    repo, repo.branches, unquote(branch), _load_json(body).get("startingPoint")
                )
            case ("DELETE", ["branch", branch]):
                return self._delete_ref(repo.branches, unquote(branch), protected=_DEFAULT_BRANCH)
            case ("POST", ["tag", revision]):
                tag = str(_load_json(body).get("tag") or "")
                return self._create_ref(repo, repo.tags, tag, unquote(revision))
            case ("DELETE", ["tag", tag]):
                return self._delete_ref(repo.tags, unquote(tag), protected=None)
        raise _HubError(404, f"loopback hub: route not implemented: {method} .../{'/'.join(rest)}")

    # ------------------------------------------------------------------ repos
    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(
                404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound"
            )
        return repo

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _whoami(self) -> _Response:
        return _json(
            {
                "type": "user",
                "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                "name": self.user,
                "fullname": self.user,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "loopback", "role": "write"},
                },
            }
        )

    def _repo_key(self, payload: Mapping[str, Any]) -> tuple[str, str]:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise _HubError(400, f"loopback hub: unsupported repo type {repo_type!r}")
        name = payload.get("name")
        if not name or "/" in name:
            raise _HubError(400, f"Invalid repo name: {name!r}")
        return repo_type, f"{payload.get('organization') or self.user}/{name}"

    def _create_repo(self, payload: Mapping[str, Any]) -> _Response:
        key = self._repo_key(payload)
        if key in self.repos:
            # The client reads "url" from the 409 body too when exist_ok=True.
            existing = self.repos[key]
            return _json(
                {"error": "You already created this repo", "url": self._repo_url(existing)}, 409
            )
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = _Repo(repo_type=key[0], repo_id=key[1], private=private, created_at=_now())
        self.repos[key] = repo
        gitattributes = "".join(
            f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in sorted(self.lfs_extensions)
        )
        self._add_commit(
            repo,
            _DEFAULT_BRANCH,
            None,
            "initial commit",
            "",
            {".gitattributes": _Blob.of(gitattributes.encode(), False)},
        )
        return _json({"url": self._repo_url(repo), "name": repo.repo_id, "id": repo.repo_id})

    def _delete_repo(self, payload: Mapping[str, Any]) -> _Response:
        key = self._repo_key(payload)
        self._repo(*key)
        del self.repos[key]
        return _Response(200)

    def _add_commit(
        self,
        repo: _Repo,
        branch: str,
        parent: str | None,
        title: str,
        message: str,
        files: dict[str, _Blob],
    ) -> _Commit:
        seed = json.dumps(
            [
                next(self._counter),
                repo.repo_id,
                parent,
                title,
                sorted((p, b.oid) for p, b in files.items()),
            ]
        )
        commit = _Commit(
            hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files
        )
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _repo_info(self, repo: _Repo, commit: _Commit) -> _Response:
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {
                "rfilename": path,
                "size": len(blob.data),
                "blobId": blob.oid,
            }
            if blob.lfs:
                sibling["lfs"] = {
                    "size": len(blob.data),
                    "sha256": blob.sha256,
                    "pointerSize": blob.pointer_size,
                }
            siblings.append(sibling)
        namespace, name = repo.repo_id.split("/", 1)
        return _json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": namespace,
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "siblings": siblings,
                "usedStorage": sum(len(b.data) for b in commit.files.values()),
                **({"modelId": repo.repo_id} if repo.repo_type == "model" else {}),
                **(
                    {"subdomain": name, "runtime": {"stage": "NO_APP_FILE"}}
                    if repo.repo_type == "space"
                    else {}
                ),
            }
        )

    # ------------------------------------------------------------------ refs and history
    def _refs(self, repo: _Repo) -> _Response:
        def refs(names: Mapping[str, str], kind: str) -> list[dict[str, str]]:
            return [
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha}
                for n, sha in sorted(names.items())
            ]

        return _json(
            {
                "branches": refs(repo.branches, "heads"),
                "tags": refs(repo.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def _commits(self, repo: _Repo, revision: str, formatted: bool) -> _Response:
        items = []
        for commit in repo.history(repo.resolve(revision).sha):
            item: dict[str, Any] = {
                "id": commit.sha,
                "title": commit.title,
                "message": commit.message,
                "date": commit.date,
                "authors": [{"user": self.user}],
            }
            if formatted:
                item["formatted"] = {"title": commit.title, "message": commit.message}
            items.append(item)
        return _json(items)

    def _create_ref(
        self, repo: _Repo, refs: dict[str, str], name: str, start: str | None
    ) -> _Response:
        if not name:
            raise _HubError(400, "loopback hub: missing ref name")
        if name in refs:
            raise _HubError(409, f"Reference already exists: {name}")
        refs[name] = repo.resolve(start or _DEFAULT_BRANCH).sha
        return _Response(200)

    def _delete_ref(self, refs: dict[str, str], name: str, protected: str | None) -> _Response:
        if name == protected:
            raise _HubError(403, f"loopback hub: cannot delete {name}")
        if refs.pop(name, None) is None:
            raise _HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
        return _Response(200)

    # ------------------------------------------------------------------ listing
    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        """Tree / paths-info entry for the file or folder ``path`` (which must exist)."""
        blob = commit.files.get(path)
        if blob is not None:
            entry: dict[str, Any] = {
                "type": "file",
                "oid": blob.oid,
                "size": len(blob.data),
                "path": path,
            }
            if blob.lfs:
                entry["lfs"] = {
                    "oid": blob.sha256,
                    "size": len(blob.data),
                    "pointerSize": blob.pointer_size,
                }
        else:
            signature = json.dumps(sorted(_subtree(commit.files, path).items())).encode()
            entry = {
                "type": "directory",
                "oid": hashlib.sha1(signature).hexdigest(),
                "size": 0,
                "path": path,
            }
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path)
        return entry

    @staticmethod
    def _last_commit(repo: _Repo, commit: _Commit, path: str) -> dict[str, str]:
        """The oldest commit, walking back from ``commit``, since which ``path`` is unchanged."""
        current = _subtree(commit.files, path)
        last = commit
        for older in itertools.islice(repo.history(commit.sha), 1, None):
            if _subtree(older.files, path) != current:
                break
            last = older
        return {"id": last.sha, "title": last.title, "date": last.date}

    def _tree(
        self, repo: _Repo, revision: str, base: str, recursive: bool, expand: bool
    ) -> _Response:
        commit = repo.resolve(revision)
        base = base.strip("/")
        prefix = f"{base}/" if base else ""
        under = sorted(p for p in commit.files if p.startswith(prefix))
        if base and not under:
            raise _HubError(404, f"Entry not found: {base}", code="EntryNotFound")
        paths: dict[str, None] = {}  # ordered set of folder and file paths
        for path in under:
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(len(parts), depth + 1)):
                paths[prefix + "/".join(parts[:i])] = None
            if len(parts) <= depth:
                paths[path] = None
        return _json([self._entry(repo, commit, p, expand) for p in paths])

    def _paths_info(self, repo: _Repo, revision: str, body: bytes) -> _Response:
        commit = repo.resolve(revision)
        if body.lstrip().startswith(b"{"):
            payload = _load_json(body)
            wanted, expand = list(payload.get("paths") or []), bool(payload.get("expand"))
        else:  # form-encoded, as HfApi.get_paths_info sends it
            form = parse_qs(body.decode())
            wanted, expand = form.get("paths", []), _flag(form, "expand")
        entries = [
            self._entry(repo, commit, p.strip("/"), expand)
            for p in wanted
            if p.strip("/") and _subtree(commit.files, p.strip("/"))
        ]
        return _json(entries)

    # ------------------------------------------------------------------ uploads
    def _preupload(self, repo: _Repo, revision: str, payload: Mapping[str, Any]) -> _Response:
        commit = repo.resolve(revision)
        answers = []
        for item in payload.get("files") or []:
            path, size = item["path"], int(item.get("size") or 0)
            lfs = os.path.splitext(path)[1].lower() in self.lfs_extensions or size >= LFS_MIN_SIZE
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            existing = commit.files.get(path)
            if existing is not None:  # lets the client skip unchanged files, as on the Hub
                answer["oid"] = existing.sha256 if lfs else _git_oid(existing.data)
            answers.append(answer)
        return _json({"files": answers})

    def _lfs_batch(self, payload: Mapping[str, Any]) -> _Response:
        if payload.get("operation") != "upload":
            raise _HubError(400, "loopback hub: only the LFS 'upload' operation is supported")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = str(obj["oid"]), int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.lfs_objects:  # no "actions" = already stored, nothing to upload
                href = f"{self.endpoint}/_loopback/lfs/{oid}"
                answer["authenticated"] = True
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(answer)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str, body: bytes) -> _Response:
        actual = hashlib.sha256(body).hexdigest()
        if actual != oid:
            raise _HubError(400, f"LFS object sha256 mismatch: expected {oid}, got {actual}")
        self.lfs_objects[oid] = body
        return _Response(200)

    def _lfs_verify(self, oid: str, payload: Mapping[str, Any]) -> _Response:
        data = self.lfs_objects.get(oid)
        if data is None:
            raise _HubError(404, f"LFS object not found: {oid}")
        if "size" in payload and int(payload["size"]) != len(data):
            raise _HubError(400, f"LFS object size mismatch for {oid}")
        return _json({"oid": oid, "size": len(data)})

    def _commit(self, repo: _Repo, branch: str, body: bytes) -> _Response:
        if branch not in repo.branches:
            if branch in repo.tags or branch in repo.commits:
                raise _HubError(400, f"loopback hub: can only commit to a branch, not {branch!r}")
            raise _HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "loopback hub: commit payload must start with a 'header' line")
        header = lines[0]["value"]
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise _HubError(412, f"parentCommit {parent} is not the head of {branch} ({head})")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            self._apply(files, line.get("key"), line.get("value") or {})
        commit = self._add_commit(
            repo,
            branch,
            head,
            header.get("summary") or "update",
            header.get("description") or "",
            files,
        )
        url = f"{self._repo_url(repo)}/commit/{commit.sha}"
        return _json({"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": None})

    def _apply(self, files: dict[str, _Blob], key: str | None, value: Mapping[str, Any]) -> None:
        """Apply one NDJSON commit operation to ``files`` in place."""
        path = str(value.get("path") or "").strip("/")
        if not path:
            raise _HubError(400, f"loopback hub: operation {key!r} without a path")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise _HubError(
                    400, f"loopback hub: unsupported encoding {value.get('encoding')!r}"
                )
            files[path] = _Blob.of(base64.b64decode(value.get("content") or ""), lfs=False)
        elif key == "lfsFile":
            data = self.lfs_objects.get(str(value.get("oid")))
            if data is None:
                raise _HubError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
            files[path] = _Blob.of(data, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        elif key == "deletedFolder":
            doomed = _subtree(files, path)
            if not doomed:
                raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound")
            for doomed_path in doomed:
                del files[doomed_path]
        else:
            raise _HubError(400, f"loopback hub: unsupported commit operation {key!r}")

    # ------------------------------------------------------------------ downloads
    def _resolve(self, repo: _Repo, revision: str, path: str) -> _Response:
        commit = repo.resolve(revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HubError(
                404,
                f"Entry not found: {path}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        return _Response(200, blob.data, headers)


def _split_type_prefix(segments: list[str]) -> tuple[str, list[str]]:
    """Split the ``datasets/`` / ``spaces/`` prefix off a git-side URL (none means a model)."""
    if segments and segments[0] in _API_KINDS and segments[0] != "models":
        return _API_KINDS[segments[0]], segments[1:]
    return "model", segments


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except json.JSONDecodeError as err:
        raise _HubError(400, f"loopback hub: invalid JSON body: {err}") from err
    if not isinstance(payload, dict):
        raise _HubError(400, "loopback hub: JSON body must be an object")
    return payload


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return any(v.lower() in ("1", "true") for v in query.get(name, []))


def _apply_range(response: _Response, range_header: str) -> _Response:
    """Serve one ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range (HfFileSystem reads by range)."""
    spec = range_header.strip().removeprefix("bytes=")
    size = len(response.body)
    start_text, _, end_text = spec.partition("-")
    try:
        if "," in spec or not (start_text or end_text):
            raise ValueError(spec)
        if start_text:
            start, end = int(start_text), min(int(end_text) if end_text else size - 1, size - 1)
        else:
            start, end = max(size - int(end_text), 0), size - 1
    except ValueError:  # multi-range or malformed: the whole file is a valid answer
        return response
    if start >= size or start > end:
        return _Response(416, b"", {"Content-Range": f"bytes */{size}"})
    headers = {**response.headers, "Content-Range": f"bytes {start}-{end}/{size}"}
    return _Response(206, response.body[start : end + 1], headers)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) handler: parse, route under the backend lock, answer."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: no per-request lines on stderr."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()  # always drain the body so the connection can be reused
        url = urlsplit(self.path)
        backend = self.server.backend
        try:
            with backend.lock:
                response = backend.route(
                    self.command, url.path.split("/")[1:], parse_qs(url.query), body
                )
            # Only file downloads (resolve) carry an ETag; they are the only ranged reads.
            if response.status == 200 and self.headers.get("Range") and "ETag" in response.headers:
                response = _apply_range(response, self.headers["Range"])
        except _HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            response = _json({"error": err.message}, err.status, headers)
        except Exception as err:  # a bug in this server: tell the client instead of hanging up
            response = _json({"error": f"loopback hub internal error: {err!r}"}, 500)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))  # HEAD: size of the GET body
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], backend: _Backend, sock: socket.socket | None
    ) -> None:
        super().__init__(address, _Handler, bind_and_activate=sock is None)
        self.backend = backend
        if sock is not None:  # serve on a socket the caller already bound
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()[:2]
            self.server_activate()


class LoopbackHub:
    """An in-memory, unauthenticated Hub-compatible HTTP server on ``127.0.0.1``, for tests.

    Args:
        host: Interface to bind (default ``127.0.0.1``; anything else exposes an unauthenticated
            server, so do not).
        port: Port to bind; ``0`` (default) picks a free one.
        sock: An already bound socket to serve on instead of binding ``host:port``.
        user: Namespace of repos created without an organization (and the ``whoami`` name).
        lfs_extensions: Extensions uploaded through LFS rather than inline (see module docs).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        user: str = DEFAULT_USER,
        lfs_extensions: Iterable[str] = LFS_EXTENSIONS,
    ) -> None:
        self._address = (host, port)
        self._sock = sock
        self._backend = _Backend(user, lfs_extensions)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns ``self``. Idempotent."""
        if self._server is None:
            self._server = _Server(self._address, self._backend, self._sock)
            host, port = self._server.server_address[:2]
            self._backend.endpoint = f"http://{host}:{port}"
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="loopback-hub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. The stored repos are kept until GC."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (the value for ``HF_ENDPOINT``)."""
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running: call start() first")
        return self._backend.endpoint

    def env(self, hf_home: str) -> dict[str, str]:
        """Environment variables that point the HF clients at this server.

        Sets the endpoint, a dummy token (uploads need one; it is never checked), Xet off (this
        server speaks only classic LFS), telemetry off, offline mode explicitly off (an exported
        ``HF_HUB_OFFLINE=1`` would short-circuit every request), and every cache under
        ``hf_home`` so test pushes never land in a developer's real cache.
        """
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": DUMMY_TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": hf_home,
            "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
            "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
            "HF_DATASETS_CACHE": os.path.join(hf_home, "datasets"),
            "HF_MODULES_CACHE": os.path.join(hf_home, "modules"),
        }

    def apply_env(self, hf_home: str) -> None:
        """Export :meth:`env` into ``os.environ`` (also inherited by subprocesses).

        Raises:
            RuntimeError: if ``huggingface_hub``, ``datasets`` or ``transformers`` is already
                imported, since they read ``HF_ENDPOINT`` once at import time and would keep
                talking to huggingface.co.
        """
        imported = [name for name in _HF_CLIENT_MODULES if name in sys.modules]
        if imported:
            raise RuntimeError(
                f"LoopbackHub.apply_env() ran after {', '.join(imported)} was imported. These "
                "libraries read HF_ENDPOINT (and HF_HOME, HF_HUB_OFFLINE...) once, at import time, "
                "so they would keep using https://huggingface.co. Fix: apply the environment "
                "before anything imports them. In pytest, enable the plugin with pytest_plugins = "
                '["hf_tae.testing.pytest_plugin"] and import huggingface_hub / datasets / '
                "transformers (and modules that import them: peft, trl, hf_tae.trainers...) inside "
                "fixtures or test modules, not at the top of conftest.py. Elsewhere, run "
                "`python -m hf_tae.testing.loopback_hub --port-file F` and export the variables "
                "of LoopbackHub.env() before starting Python."
            )
        os.environ.update(self.env(hf_home))

    def files(
        self, repo_id: str, repo_type: str = "model", revision: str = _DEFAULT_BRANCH
    ) -> dict[str, bytes]:
        """Contents of ``repo_id`` at ``revision`` (branch, tag or commit sha), for assertions.

        Raises:
            KeyError: if the repository or the revision does not exist.
        """
        with self._backend.lock:
            try:
                commit = self._backend._repo(repo_type, repo_id).resolve(revision)
            except _HubError as err:
                raise KeyError(err.message) from None
            return {path: blob.data for path, blob in commit.files.items()}


def main(argv: list[str] | None = None) -> int:
    """Run a :class:`LoopbackHub` in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_tae.testing.loopback_hub",
        description="Loopback Hugging Face Hub for tests: in memory, no auth. Not a Hub.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--port-file", help="write the endpoint URL to this file once listening")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with LoopbackHub(args.host, args.port) as hub:
        if args.port_file:
            tmp = f"{args.port_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(hub.endpoint + "\n")
            os.replace(tmp, args.port_file)  # readers never see a half-written file
        print(hub.endpoint, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
