"""A Hub-compatible HTTP server for the tests, on 127.0.0.1.

It implements what huggingface_hub's client uses to create a repo, upload to it (preupload, the LFS batch
API with a single-part PUT and a verify call, then the ndjson commit), describe it (model info, tree,
paths-info) and download from it (``resolve/``, HEAD then GET, with the ETag / X-Repo-Commit / X-Linked-*
headers that ``hf_hub_download`` checks). State lives in memory; a commit is all-or-nothing, as on the Hub.

Errors can be injected with ``FakeHub.fail`` (say, a 500 on the weights' PUT or on the commit) to check what
a client does when the server breaks mid-upload. Set ``HF_HUB_DISABLE_XET=1`` in clients: this server speaks
LFS, not Xet.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Stored as LFS objects, as the Hub's default .gitattributes does; bigger files too.
LFS_SUFFIXES = (".safetensors", ".onnx", ".png", ".bin", ".pt", ".pth", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the content, or of the pointer file for an LFS object."""
        return git_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the Hub's format
        self.commits: Dict[str, Dict[str, Blob]] = {}
        self.branches: Dict[str, str] = {}

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """The server and its state. Use as a context manager, or call ``start()`` / ``stop()``."""

    def __init__(self, tokens: Optional[Dict[str, str]] = None, orgs: Optional[Dict[str, List[str]]] = None):
        self.tokens = dict(tokens or {})  # token -> user name
        self.orgs = dict(orgs or {})  # user -> organisations the user can write to
        self.repos: Dict[str, Repo] = {}
        self.lfs: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request, in order
        self._failures: List[list] = []  # [method, compiled pattern, status, times left]
        self._hangs: List[tuple] = []  # (method, compiled pattern): read the request, never answer
        self._trickles: List[tuple] = []  # (method, compiled pattern): answer one byte a second
        self._losses: List[tuple] = []  # (method, compiled pattern): do what is asked, never answer
        self._meetings: List[tuple] = []  # (method, compiled pattern, threading.Barrier): wait for each other
        self.hung: List[Tuple[float, str, str]] = []  # (time.monotonic(), method, path) of each unanswered request
        self._release = threading.Event()
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers ----------------------------------------------------------------------------------
    def fail(self, method: str, pattern: str, status: int = 500, times: Optional[int] = 1,
             headers: Optional[dict] = None) -> None:
        """Answer the next ``times`` requests (None: all) whose path matches ``pattern`` with ``status`` (and
        ``headers``, say a Retry-After). The request body is read first: the server fails after the client has
        sent its data."""
        with self._lock:
            self._failures.append([method.upper(), re.compile(pattern), status, times, dict(headers or {})])

    def hang(self, method: str, pattern: str) -> None:
        """Read every request whose path matches ``pattern`` and never answer it (until ``stop``)."""
        with self._lock:
            self._hangs.append((method.upper(), re.compile(pattern)))

    def trickle(self, method: str, pattern: str) -> None:
        """Answer every request whose path matches ``pattern`` one byte a second (headers first), a long answer
        that takes minutes: each read of the client gets a byte, so only a deadline for the whole answer ends it."""
        with self._lock:
            self._trickles.append((method.upper(), re.compile(pattern)))

    def lose_answer(self, method: str, pattern: str) -> None:
        """Carry out every request whose path matches ``pattern`` (a commit is made) and never answer it: the
        answer is lost on the way, as when a connection breaks after the server's work."""
        with self._lock:
            self._losses.append((method.upper(), re.compile(pattern)))

    def meet(self, method: str, pattern: str, parties: int = 2, timeout: float = 60.0) -> None:
        """Hold each request whose path matches ``pattern`` until ``parties`` of them have arrived, then carry
        them all out (one after the other, as the Hub does): two clients racing for the same thing get there
        together, every time. Past ``timeout`` seconds a held request goes on alone."""
        with self._lock:
            self._meetings.append((method.upper(), re.compile(pattern), threading.Barrier(parties, timeout=timeout)))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def files(self, repo_id: str, revision: str = "main") -> Dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return {path: blob.data for path, blob in repo.commits[repo.resolve(revision)].items()}

    def commit_count(self, repo_id: str) -> int:
        with self._lock:
            return len(self.repos[repo_id].commits) if repo_id in self.repos else 0

    # -- state changes (called by the handler, under the lock) -----------------------------------------
    def _injected_failure(self, method: str, path: str) -> Optional[Tuple[int, dict]]:
        for rule in self._failures:
            if rule[0] == method and rule[1].search(path) and (rule[3] is None or rule[3] > 0):
                if rule[3] is not None:
                    rule[3] -= 1
                return rule[2], rule[4]
        return None

    def _new_commit(self, repo: Repo, files: Dict[str, Blob], branch: str = "main") -> str:
        parent = repo.branches.get(branch, "")
        oid = hashlib.sha1(f"{parent}{next(self._counter)}{sorted((p, b.oid) for p, b in files.items())}".encode()
                           ).hexdigest()
        repo.commits[oid] = dict(files)
        repo.branches[branch] = oid
        return oid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format, *args):  # keep test output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _trickle(self) -> None:
        body = b" " * 600 + b"{}"
        answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body)
        self.close_connection = True
        for i in range(len(answer)):
            if self.hub._release.wait(1.0):
                return
            try:
                self.wfile.write(answer[i:i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, content_length=None) -> None:
        if getattr(self, "_lose", False):
            return
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _user(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _can_write(self, user: Optional[str], namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if namespace != user and namespace not in self.hub.orgs.get(user, []):
            raise HubError(403, f"You don't have the rights to write to {namespace}")

    def _repo(self, repo_id: str, user: Optional[str], write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        visible = repo is not None and (not repo.private or (user is not None and (
            namespace == user or namespace in self.hub.orgs.get(user, []))))
        if not visible:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._can_write(user, namespace)
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
            failure = self.hub._injected_failure(self.command, path)
            hang = any(m == self.command and p.search(path) for m, p in self.hub._hangs)
            trickle = any(m == self.command and p.search(path) for m, p in self.hub._trickles)
            self._lose = any(m == self.command and p.search(path) for m, p in self.hub._losses)
            if hang or trickle or self._lose:
                self.hub.hung.append((time.monotonic(), self.command, path))
        for method, pattern, barrier in self.hub._meetings:
            if method == self.command and pattern.search(path):
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    pass
        if hang:
            self.hub._release.wait()
            self.close_connection = True
            return
        if trickle:
            self._trickle()
            return
        if failure is not None:
            status, headers = failure
            self._json(status, {"error": f"injected failure {status}"}, {"X-Error-Message": "injected failure",
                                                                          **headers})
            return
        for method, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, path)
            if match and self.command in method:
                try:
                    with self.hub._lock:
                        getattr(self, name)(*[unquote(g or "") for g in match.groups()], query=query, body=body)
                except HubError as e:
                    headers = dict(e.headers)
                    headers["X-Error-Message"] = e.message
                    if e.code:
                        headers["X-Error-Code"] = e.code
                    self._json(e.status, {"error": e.message}, headers)
                if self._lose:
                    self.hub._release.wait()
                    self.close_connection = True
                return
        self._json(404, {"error": f"no route for {self.command} {path}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- API -------------------------------------------------------------------------------------------
    def whoami(self, query, body):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._json(200, {"type": "user", "name": user, "orgs": [{"name": o} for o in self.hub.orgs.get(user, [])],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def create_repo(self, query, body):
        payload = json.loads(body or b"{}")
        user = self._user()
        namespace = payload.get("organization") or user
        self._can_write(user, namespace)
        name = payload.get("name") or ""
        if not re.fullmatch(r"[\w][\w.\-]{0,94}[\w]|[\w]", name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        if repo_id in self.hub.repos:  # the Hub's 409 carries the repo's url, which the client reads
            self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            return
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.hub.repos[repo_id] = repo
        self.hub._new_commit(repo, {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def delete_repo(self, query, body):
        payload = json.loads(body or b"{}")
        user = self._user()
        namespace = payload.get("organization") or user
        self._can_write(user, namespace)
        repo_id = f"{namespace}/{payload.get('name')}"
        if repo_id not in self.hub.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        del self.hub.repos[repo_id]
        self._json(200, {})

    def validate_yaml(self, query, body):
        content = json.loads(body).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            self._json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
            return
        if metadata is not None and not isinstance(metadata, dict):
            self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            return
        self._json(200, {"errors": [], "warnings": []})

    def model_info(self, owner, name, revision=None, query=None, body=None):
        repo = self._repo(f"{owner}/{name}", self._user())
        oid = self._commit_of(repo, revision or "main")
        files = repo.commits[oid]
        blobs = "true" in (query or {}).get("blobs", [])
        siblings = []
        for path, blob in sorted(files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": oid, "private": repo.private,
                "createdAt": repo.created, "lastModified": repo.created, "siblings": siblings, "tags": []}
        card = _front_matter(files.get("README.md"))
        if card:
            info.update(cardData=card, tags=card.get("tags", []), library_name=card.get("library_name"),
                        pipeline_tag=card.get("pipeline_tag"))
        self._json(200, info)

    def model_info_at(self, owner, name, revision, query, body):
        self.model_info(owner, name, revision, query=query, body=body)

    def tree(self, owner, name, revision, subpath, query, body):
        repo = self._repo(f"{owner}/{name}", self._user())
        files = repo.commits[self._commit_of(repo, revision)]
        prefix = subpath.strip("/")
        recursive = "true" in [v.lower() for v in query.get("recursive", [])]
        entries, folders = [], set()
        for path, blob in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                folders.add(f"{prefix}/{rest.split('/')[0]}".strip("/"))
                continue
            entries.append(_file_entry(path, blob))
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(200, entries)

    def paths_info(self, owner, name, revision, query, body):
        """The entries of the given paths at a revision (form-encoded ``paths``); unknown paths are left out."""
        repo = self._repo(f"{owner}/{name}", self._user())
        files = repo.commits[self._commit_of(repo, revision)]
        paths = parse_qs(body.decode()).get("paths", [])
        self._json(200, [_file_entry(p, files[p]) for p in paths if p in files])

    def preupload(self, owner, name, revision, query, body):
        repo = self._repo(f"{owner}/{name}", self._user(), write=True)
        files = repo.commits[self._commit_of(repo, revision)]
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            existing = files.get(f["path"])
            remote_oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote_oid})
        self._json(200, {"files": out, "commitOid": repo.branches["main"]})

    def lfs_batch(self, owner, name, query, body):
        self._repo(f"{owner}/{name}", self._user(), write=True)
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            stored = self.hub.lfs.get(obj["oid"])
            if stored is None or len(stored) != obj["size"]:
                signature = secrets.token_hex(8)  # stands in for a presigned storage URL
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-storage/{obj['oid']}?sig={signature}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid, query, body):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        self.hub.lfs[oid] = body
        self._send(200)

    def lfs_verify(self, query, body):
        payload = json.loads(body)
        stored = self.hub.lfs.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            raise HubError(404, "LFS object not found")
        self._json(200, {"success": True})

    def commit(self, owner, name, revision, query, body):
        repo = self._repo(f"{owner}/{name}", self._user(), write=True)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[revision]])
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[revision]:
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.hub.lfs.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        oid = self.hub._new_commit(repo, files, revision)
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{oid}",
                         "hookOutput": ""})

    def resolve(self, owner, name, revision, path, query, body):
        repo = self._repo(f"{owner}/{name}", self._user())
        oid = self._commit_of(repo, revision)
        blob = repo.commits[oid].get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": len(blob.data)})
        data, status = blob.data, 200
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if range_match and self.command == "GET":
            start = int(range_match.group(1))
            end = int(range_match.group(2)) if range_match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers)


def _file_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
    return entry


def _front_matter(blob: Optional[Blob]) -> Optional[dict]:
    if blob is None:
        return None
    match = re.match(r"^---\n(.*?)\n---\n", blob.data.decode("utf-8", "replace"), re.S)
    try:
        return yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None


_REPO = r"/([\w.\-]+)/([\w.\-]+)"
_ROUTES = [
    (("GET",), r"/api/whoami-v2", "whoami"),
    (("POST",), r"/api/repos/create", "create_repo"),
    (("DELETE",), r"/api/repos/delete", "delete_repo"),
    (("POST",), r"/api/validate-yaml", "validate_yaml"),
    (("GET",), r"/api/models" + _REPO, "model_info"),
    (("GET",), r"/api/models" + _REPO + r"/revision/([^/]+)", "model_info_at"),
    (("GET",), r"/api/models" + _REPO + r"/tree/([^/]+)(/.*)?", "tree"),
    (("POST",), r"/api/models" + _REPO + r"/paths-info/([^/]+)", "paths_info"),
    (("POST",), r"/api/models" + _REPO + r"/preupload/([^/]+)", "preupload"),
    (("POST",), r"/api/models" + _REPO + r"/commit/([^/]+)", "commit"),
    (("POST",), _REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    (("PUT",), r"/lfs-storage/([0-9a-f]{64})", "lfs_put"),
    (("POST",), r"/lfs-verify", "lfs_verify"),
    (("GET", "HEAD"), _REPO + r"/resolve/([^/]+)/(.+)", "resolve"),
]


@contextlib.contextmanager
def trickling_weights_hub(token: str, timm_repo: str):
    """A loopback Hub holding timm's weights repo ``timm_repo`` and a run repo ``owner/r20`` that answers every
    download of them one byte a second: the stalled server that a load's deadline must end."""
    from huggingface_hub import HfApi

    with FakeHub(tokens={token: "uploader"}, orgs={"uploader": [timm_repo.split("/")[0], "owner"]}) as server:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo(timm_repo)
        api.upload_file(path_or_fileobj=b"never read", path_in_repo="model.safetensors", repo_id=timm_repo)
        api.create_repo("owner/r20")
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="owner/r20")
        for method in ("GET", "HEAD"):
            server.trickle(method, r"/resolve/")
        yield server
