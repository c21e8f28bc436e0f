"""A real, local Hugging Face Hub for tests: a threaded HTTP server, not a mock.

It speaks the endpoints huggingface_hub 1.x calls for ``snapshot_download``,
``hf_hub_download``, ``repo_info``/``resolve_revision`` and ``get_safetensors_metadata``:

    GET  /api/{models|datasets}/{repo}[/revision/{rev}]       repo info (sha, siblings, gated, private)
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]     file listing (recursive or not)
    HEAD /[datasets/]{repo}/resolve/{rev}/{path}               metadata (X-Repo-Commit, ETag, length)
    GET  /[datasets/]{repo}/resolve/{rev}/{path}               content, with Range support

Access control follows what the real Hub answers (see huggingface_hub/utils/_http.py
``hf_raise_for_status``, which classifies errors by ``X-Error-Code``):

- missing or private repo, anonymous request  -> 401 ``RepoNotFound``
  (the real Hub does not tell anonymous callers whether a private repo exists)
- missing or private repo, known token without access -> 404 ``RepoNotFound``
- unknown token -> 401 "Invalid credentials in Authorization header"
- gated repo: info and tree are public; file downloads answer 401 (anonymous)
  or 403 (token without access) with ``GatedRepo``
- unknown branch/tag/commit -> 404 ``RevisionNotFound``

Simplifications: one commit per repo (its branch is ``main``, extra tags can point at it);
LFS-like files are served directly (no CDN redirect) with their sha256 as ETag; no Xet
headers, so the client uses plain HTTP. Every request is recorded in ``requests``.

The upload path, as huggingface_hub 1.x calls it without Xet (``HF_HUB_DISABLE_XET=1``; see
/work/shared/hub-upload-facts.md), writing into ``storage``:

    POST /api/repos/create                         409 with the url when it exists
    POST /api/models/{repo}/branch/{branch}        409 when it exists
    POST /api/validate-yaml                        the README's front matter (400 with errors)
    POST /api/models/{repo}/paths-info/{rev}       what a revision holds (sha256 of LFS files, blob ids)
    POST /api/models/{repo}/preupload/{rev}        regular or lfs per file, and the existing blob id
    POST /{repo}.git/info/lfs/objects/batch        basic transfer: no upload action for stored objects
    PUT  /lfs-upload/{oid}, POST /lfs-verify       the object's bytes (sha256-checked), then verify
    POST /api/models/{repo}/commit/{rev}           NDJSON: header, file, lfsFile lines (create_pr=1: a PR)

Writes need a token in ``write_tokens`` for the repo's namespace: none -> 401, an unknown one
-> 401, a known one without write access -> 403. ``cut_puts``/``cut_commits`` make the next
uploads/commits lose their connection mid-way (the client sees a dropped connection).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

_LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".pt", ".pth", ".gguf", ".model")
_INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass
class Repo:
    repo_id: str
    folder: Path
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()
    tags: tuple[str, ...] = ()
    sha: str = ""

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()
        )

    def revisions(self) -> set[str]:
        return {"main", self.sha, *self.tags, *self.branches}

    branches: dict[str, Path] = field(default_factory=dict)  # pushed branches and PR refs -> their folders

    def tree(self, revision: str) -> Path:
        return self.branches.get(revision, self.folder)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    repo_id: str | None
    filename: str | None
    status: int
    authorization: str | None
    size: int = 0  # request body bytes read


@dataclass(frozen=True)
class Commit:
    repo_id: str
    revision: str  # the branch, or refs/pr/N
    files: tuple[str, ...]  # paths added, in NDJSON order
    summary: str


@dataclass
class HubServer:
    """``with HubServer() as hub:`` serves on ``hub.url`` until the block ends."""

    known_tokens: set[str] = field(default_factory=set)
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    storage: Path | None = None  # where created repos live (uploads need it)
    write_tokens: dict[str, set[str]] = field(default_factory=dict)  # namespace -> tokens that may write there
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS objects by sha256
    commits: list[Commit] = field(default_factory=list)
    cut_puts: int = 0
    cut_commits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool = False,
        allowed_tokens: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
    ) -> Repo:
        repo = Repo(repo_id, folder, repo_type, private, gated, frozenset(allowed_tokens), tags)
        listing = "".join(f"{f}:{_sha256(folder / f)}\n" for f in repo.files())
        repo.sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        self.known_tokens.update(allowed_tokens)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def downloads(self, repo_id: str) -> set[str]:
        """Files served whole (GET on /resolve, 200; ranged reads are 206) for ``repo_id``."""
        with self._lock:
            return {
                r.filename
                for r in self.requests
                if r.repo_id == repo_id and r.method == "GET" and r.filename and r.status == 200
            }

    def uploaded_bytes(self) -> int:
        """Bytes of LFS objects the server received whole (PUT answered 200)."""
        with self._lock:
            return sum(r.size for r in self.requests if r.method == "PUT" and r.status == 200)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def __enter__(self) -> Self:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Cut(Exception):
    """Drop the connection without an answer (a cut upload)."""


class _Reply(Exception):
    """An error answer, shaped like the real Hub's (status + X-Error-* headers)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_API = re.compile(r"^/api/(models|datasets)/(?P<rest>.+)$")
_WRITE_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>paths-info|preupload|commit|branch)/(?P<rev>.+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")
_RESOLVE = re.compile(
    r"^/(?:(?P<kind>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"
)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; requests are recorded in HubServer.requests

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_POST(self) -> None:
        self._dispatch_write()

    def do_PUT(self) -> None:
        self._dispatch_write()

    # -- the upload path ------------------------------------------------------

    def _dispatch_write(self) -> None:
        path = urlsplit(self.path).path
        repo: Repo | None = None
        self._read = 0
        # read a POST body before any answer: what is left unread would be taken for the next request
        self._payload = self._body() if self.command == "POST" else b""
        try:
            if path == "/api/repos/create":
                repo, status = self._create_repo()
            elif path == "/api/validate-yaml":
                status = self._validate_yaml()
            elif m := _LFS_PUT.match(path):
                status = self._lfs_put(m["oid"])
            elif path == "/lfs-verify":
                body = json.loads(self._payload)
                status = self._send_json({}) if body["oid"] in self.hub.blobs else self._missing_object()
            elif m := _LFS_BATCH.match(path):
                repo = self._writable(m["repo"])
                status = self._lfs_batch(json.loads(self._payload))
            elif m := _WRITE_API.match(path):
                repo = self._writable(m["repo"]) if m["op"] != "paths-info" else self._repo("model", m["repo"])
                status = self._write_api(repo, m["op"], unquote(m["rev"]))
            else:
                raise _Reply(404, None, "Not Found")
        except _Cut:
            self.close_connection = True
            status = 0
        except _Reply as reply:
            status = reply.status
            self._send_error_reply(reply, repo)
        self.hub._record(Request(self.command, path, repo.repo_id if repo else None, None, status,
                                 self.headers.get("Authorization"), self._read))

    def _body(self, limit: int | None = None) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            data = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length if limit is None else min(limit, length))
        self._read += len(data)
        return data

    def _writer(self, namespace: str) -> str:
        token = self._token()
        if token is None:
            raise _Reply(401, None, "You must be authenticated to write")
        if token not in self.hub.write_tokens.get(namespace, set()):
            raise _Reply(403, None, f"You don't have the rights to write to {namespace}")
        return token

    def _writable(self, repo_id: str) -> Repo:
        repo = self._repo("model", repo_id)
        self._writer(repo_id.split("/")[0])
        return repo

    def _create_repo(self) -> tuple[Repo, int]:
        body = json.loads(self._payload)
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        self._writer(repo_id.split("/")[0])
        url = f"{self.hub.url}/{repo_id}"
        existing = self.hub.repos.get(("model", repo_id))
        if existing is not None:
            self._send_json({"error": "You already created this model repo", "url": url}, status=409)
            return existing, 409
        assert self.hub.storage is not None, "HubServer(storage=...) is needed for uploads"
        folder = self.hub.storage / repo_id.replace("/", "--")
        folder.mkdir(parents=True)
        repo = self.hub.add_repo(repo_id, folder, private=body.get("visibility") == "private",
                                 allowed_tokens=(str(self._token()),))
        return repo, self._send_json({"url": url, "name": repo_id})

    def _validate_yaml(self) -> int:
        import yaml

        content = json.loads(self._payload)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        errors = []
        try:
            meta = yaml.safe_load(m[1]) if m else {}
        except yaml.YAMLError as exc:
            meta, errors = {}, [f"invalid YAML: {exc}"]
        for key in ("base_model",):
            value = meta.get(key)
            if value is not None and not (isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value)):
                errors.append(f'"{key}" must be a Hub model id, got {value!r}')
        if not isinstance(meta.get("tags", []), list):
            errors.append('"tags" must be a list')
        if meta.get("library_name") not in (None, "gguf", "transformers"):
            errors.append(f'"library_name" {meta["library_name"]!r} is not a known library')
        if errors:
            return self._send_json({"errors": [{"message": e} for e in errors]}, status=400)
        return self._send_json({"errors": [], "warnings": []})

    def _write_api(self, repo: Repo, op: str, revision: str) -> int:
        if op == "branch":
            if revision in repo.branches:
                raise _Reply(409, None, f"Branch {revision} already exists")
            folder = repo.folder.with_name(f"{repo.folder.name}@{revision}")
            shutil.copytree(repo.folder, folder)
            repo.branches[revision] = folder
            return self._send_json({})
        self._check_revision(repo, revision)
        tree = repo.tree(revision)
        if op == "paths-info":
            paths = parse_qs(self._payload.decode()).get("paths", [])
            return self._send_json([_file_entry(tree, p) for p in paths if (tree / p).is_file()])
        if op == "preupload":
            files = json.loads(self._payload)["files"]
            return self._send_json({"files": [
                {"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"]) else "regular", "shouldIgnore": False,
                 "oid": _git_blob_sha(tree / f["path"]) if (tree / f["path"]).is_file() else None} for f in files]})
        return self._commit(repo, revision, "create_pr=1" in (urlsplit(self.path).query or ""))

    def _commit(self, repo: Repo, revision: str, create_pr: bool) -> int:
        lines = [json.loads(line) for line in self._payload.splitlines() if line.strip()]
        if self.hub.cut_commits > 0:
            self.hub.cut_commits -= 1
            raise _Cut()
        header = lines[0]["value"]
        target = revision
        if create_pr:
            target = f"refs/pr/{1 + sum(b.startswith('refs/pr/') for b in repo.branches)}"
            folder = repo.folder.with_name(f"{repo.folder.name}@pr-{target.rsplit('/', 1)[1]}")
            shutil.copytree(repo.tree(revision), folder)
            repo.branches[target] = folder
        tree, added = repo.tree(target), []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.blobs:
                    raise _Reply(400, None, f"LFS object {value['oid']} was never uploaded")
                data = self.hub.blobs[value["oid"]]
            else:
                raise _Reply(400, None, f"unsupported commit line {line['key']}")
            (tree / value["path"]).parent.mkdir(parents=True, exist_ok=True)
            (tree / value["path"]).write_bytes(data)
            added.append(value["path"])
        sha = hashlib.sha1(json.dumps([target, added, len(self.hub.commits)]).encode()).hexdigest()
        with self.hub._lock:
            self.hub.commits.append(Commit(repo.repo_id, target, tuple(added), header["summary"]))
        pr = f"{self.hub.url}/{repo.repo_id}/discussions/{target.rsplit('/', 1)[1]}" if create_pr else None
        return self._send_json({"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": pr})

    def _lfs_batch(self, body: dict[str, Any]) -> int:
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.blobs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.hub.url}/lfs-verify"}}
            objects.append(entry)
        return self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> int:
        if self.hub.cut_puts > 0:
            self.hub.cut_puts -= 1
            self._body(limit=int(self.headers.get("Content-Length") or 0) // 2)
            raise _Cut()
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Reply(400, None, "the object's sha256 does not match its oid")
        with self.hub._lock:
            self.hub.blobs[oid] = data
        return self._send_json({})

    def _missing_object(self) -> int:
        raise _Reply(404, None, "object not found")

    # -- routing --------------------------------------------------------------

    def _dispatch(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        repo: Repo | None = None
        filename: str | None = None
        try:
            if m := _RESOLVE.match(path):
                kind = "dataset" if m["kind"] else "model"
                repo, filename = self._repo(kind, m["repo"]), unquote(m["file"])
                self._check_revision(repo, unquote(m["rev"]))
                self._check_files_access(repo)
                status = self._send_file(repo, filename, body=body)
            elif m := _API.match(path):
                kind = "model" if path.startswith("/api/models/") else "dataset"
                repo, status = self._api(kind, m["rest"])
            else:
                raise _Reply(404, None, "Not Found")
        except _Reply as reply:
            status = reply.status
            self._send_error_reply(reply, repo)
        self.hub._record(
            Request(
                self.command,
                path,
                repo.repo_id if repo else None,
                filename,
                status,
                self.headers.get("Authorization"),
            )
        )

    def _api(self, kind: str, rest: str) -> tuple[Repo, int]:
        parts = rest.split("/")
        repo = self._repo(kind, "/".join(parts[:2]))
        tail = parts[2:]
        if not tail:
            return repo, self._send_info(repo, "main")
        if tail[0] == "revision" and len(tail) == 2:
            return repo, self._send_info(repo, unquote(tail[1]))
        if tail[0] == "tree" and len(tail) >= 2:
            return repo, self._send_tree(repo, unquote(tail[1]), unquote("/".join(tail[2:])))
        raise _Reply(404, None, "Not Found")

    # -- access control -------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.known_tokens:
            raise _Reply(401, None, _INVALID_TOKEN)
        return token

    def _repo(self, kind: str, repo_id: str) -> Repo:
        token = self._token()
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None or (repo.private and token not in repo.allowed_tokens):
            status = 401 if token is None else 404
            raise _Reply(status, "RepoNotFound", "Repository not found")
        return repo

    def _check_files_access(self, repo: Repo) -> None:
        if not repo.gated:
            return
        token = self._token()
        if token is None:
            msg = f"Access to model {repo.repo_id} is restricted. You must be authenticated to access it."
            raise _Reply(401, "GatedRepo", msg)
        if token not in repo.allowed_tokens:
            msg = f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
            raise _Reply(403, "GatedRepo", msg)

    def _check_revision(self, repo: Repo, revision: str) -> None:
        if revision not in repo.revisions():
            raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    # -- answers --------------------------------------------------------------

    def _send_info(self, repo: Repo, revision: str) -> int:
        self._check_revision(repo, revision)
        info = {
            "id": repo.repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "siblings": [{"rfilename": f} for f in repo.files()],
        }
        return self._send_json(info)

    def _send_tree(self, repo: Repo, revision: str, under: str) -> int:
        self._check_revision(repo, revision)
        recursive = "recursive=true" in (urlsplit(self.path).query or "").lower()
        prefix = f"{under}/" if under else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name in repo.files():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parents = name.split("/")[:-1]
                folders.update("/".join(parents[: i + 1]) for i in range(len(parents)))
            entries.append(_file_entry(repo.folder, name))
        entries += [{"type": "directory", "oid": "0" * 40, "path": f} for f in sorted(folders)]
        return self._send_json(entries)

    def _send_file(self, repo: Repo, filename: str, *, body: bool) -> int:
        path = repo.folder / filename
        if ".." in Path(filename).parts or not path.is_file():
            raise _Reply(404, "EntryNotFound", f"{filename} does not exist on main")
        data = path.read_bytes()
        status, start, end = 200, 0, len(data)
        ranged = _parse_range(self.headers.get("Range"), len(data))
        if ranged is not None:
            status, (start, end) = 206, ranged
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{_etag(path, filename)}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])
        return status

    def _send_json(self, payload: Any, status: int = 200) -> int:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return status

    def _send_error_reply(self, reply: _Reply, repo: Repo | None) -> None:
        data = json.dumps({"error": reply.message}).encode()
        self.send_response(reply.status)
        if reply.code:
            self.send_header("X-Error-Code", reply.code)
        self.send_header("X-Error-Message", reply.message)
        if repo is not None and reply.code == "EntryNotFound":
            self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` -> half-open (start, end); None means the whole file."""
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if m is None:
        return None
    start = int(m[1])
    end = min(int(m[2]) + 1, size) if m[2] else size
    return (start, max(start, end))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_blob_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(filename: str) -> bool:
    return filename.endswith(_LFS_SUFFIXES)


def _etag(path: Path, filename: str) -> str:
    # The real Hub's ETag is the sha256 for LFS files and the git blob sha1 otherwise.
    return _sha256(path) if _is_lfs(filename) else _git_blob_sha(path)


def _file_entry(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    entry: dict[str, Any] = {
        "type": "file",
        "oid": _git_blob_sha(path),
        "size": path.stat().st_size,
        "path": name,
    }
    if _is_lfs(name):
        entry["lfs"] = {"oid": _sha256(path), "size": path.stat().st_size, "pointerSize": 134}
    return entry


# -- fixture helpers ------------------------------------------------------------

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Write a valid safetensors file (zero-filled data) with the given names, dtypes and shapes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        size = count * _DTYPE_BYTES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def write_files(folder: Path, files: dict[str, str | bytes]) -> Path:
    """Create ``folder`` with the given relative files; returns ``folder``."""
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return folder
