"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for push tests.

It answers the calls the real ``huggingface_hub`` client (0.3x) makes in ``create_repo``,
``create_branch`` and ``upload_folder``:

- ``POST /api/repos/create``                       create a repo (409 + url when it exists)
- ``POST /api/validate-yaml``                      README front matter check (YAML parse)
- ``POST /api/models/{repo}/branch/{branch}``      create a branch (409 when it exists)
- ``POST /api/models/{repo}/preupload/{rev}``      upload mode per file (lfs / regular)
- ``POST /{repo}.git/info/lfs/objects/batch``      LFS batch; answers ``transfer: basic`` and
                                                   never offers xet, so the client uses LFS
- ``PUT  /lfs-objects/{oid}``                      LFS upload; sha256 and size are verified
- ``POST /lfs-verify/{oid}``                       LFS verify
- ``POST /api/models/{repo}/commit/{rev}``         ndjson commit (regular files base64, LFS
                                                   files by oid; refused if an oid is missing)

Every request (line, headers, body) is recorded. ``fail(kind, status, times)`` makes the next
``times`` requests of a kind (``create``, ``preupload``, ``lfs_batch``, ``lfs_put``, ``commit``)
answer ``status``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".onnx_data", ".bin", ".pt", ".png", ".npy")


@dataclass
class Request:
    method: str
    path: str  # raw request target, query included
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, dict]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)
    prs: int = 0


class HubState:
    """What the server has received; shared with the handler threads."""

    def __init__(self, token: str, lfs_threshold: int = 10 << 20, user: str = "tester") -> None:
        self.token, self.lfs_threshold, self.user = token, lfs_threshold, user
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> verified content
        self.failures: dict[str, list[int]] = {}
        self.lfs_puts: list[str] = []

    def fail(self, kind: str, status: int = 500, times: int = 1) -> None:
        with self.lock:
            self.failures.setdefault(kind, []).extend([status] * times)

    def take_failure(self, kind: str) -> int | None:
        with self.lock:
            q = self.failures.get(kind)
            return q.pop(0) if q else None

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """Content of every file at the head of a branch."""
        out = {}
        for path, f in self.repos[repo_id].branches[branch].items():
            out[path] = self.lfs[f["oid"]] if f["mode"] == "lfs" else f["data"]
        return out

    def modes(self, repo_id: str, branch: str = "main") -> dict[str, str]:
        return {p: f["mode"] for p, f in self.repos[repo_id].branches[branch].items()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made per server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        return None

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, obj: dict | None = None,
              ctype: str = "application/json") -> None:
        raw = json.dumps(obj if obj is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        if status >= 400 and obj and "error" in obj:
            self.send_header("X-Error-Message", str(obj["error"])[:200])
        self.end_headers()
        self.wfile.write(raw)
        self.rec.status = status

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _fail(self, kind: str) -> bool:
        status = self.state.take_failure(kind)
        if status is None:
            return False
        self._send(status, {"error": f"injected {kind} failure (HTTP {status})"})
        return True

    def _handle(self, method: str) -> None:
        body = self._body()
        self.rec = Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        with self.state.lock:
            self.state.requests.append(self.rec)
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        try:
            self._route(method, path, query, body)
        except Exception as exc:  # noqa: BLE001 - report server bugs to the client
            self._send(500, {"error": f"stand-in server error: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        st = self.state
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "PUT" and path.startswith("/lfs-objects/"):
            return self._lfs_put(path.rsplit("/", 1)[1], body)
        if method == "POST" and path.startswith("/lfs-verify/"):
            oid = path.rsplit("/", 1)[1]
            return self._send(200 if oid in st.lfs else 404,
                              {} if oid in st.lfs else {"error": "object not found"})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(path[1:-len(".git/info/lfs/objects/batch")], json.loads(body))
        if method == "POST" and path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for verb in ("preupload", "commit", "branch"):
                marker = f"/{verb}/"
                if marker in rest:
                    repo_id, rev = rest.split(marker, 1)
                    return getattr(self, f"_{verb}")(repo_id, rev, query, body)
        self._send(404, {"error": f"stand-in server: no route for {method} {path}"})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._send(404, {"error": "Repository not found"})
        return repo

    def _create(self, req: dict) -> None:
        if not self._authorized() or self._fail("create"):
            return
        repo_id = f"{req.get('organization') or self.state.user}/{req['name']}"
        base = f"http://{self.headers['Host']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{base}/{repo_id}"})
            self.state.repos[repo_id] = Repo(private=bool(req.get("private")))
        self._send(200, {"url": f"{base}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, req: dict) -> None:
        import yaml

        if not self._authorized():
            return
        text = req.get("content", "")
        errors = []
        if text.startswith("---"):
            try:
                yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError as exc:
                errors.append({"message": str(exc)})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _branch(self, repo_id: str, branch: str, query: dict, body: bytes) -> None:
        if not self._authorized() or (repo := self._repo(repo_id)) is None:
            return
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        with self.state.lock:
            if branch in repo.branches:
                return self._send(409, {"error": "Reference already exists"})
            repo.branches[branch] = dict(repo.branches[start])
        self._send(200, {})

    def _mode(self, f: dict) -> str:
        sample = base64.b64decode(f.get("sample", ""))
        if (f["path"].endswith(LFS_SUFFIXES) or f["size"] >= self.state.lfs_threshold
                or b"\x00" in sample):
            return "lfs"
        return "regular"

    def _preupload(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        if not self._authorized() or self._fail("preupload") or self._repo(repo_id) is None:
            return
        files = json.loads(body)["files"]
        self._send(200, {"files": [{"path": f["path"], "uploadMode": self._mode(f),
                                    "shouldIgnore": False} for f in files]})

    def _lfs_batch(self, repo_id: str, req: dict) -> None:
        if not self._authorized() or self._fail("lfs_batch") or self._repo(repo_id) is None:
            return
        base = f"http://{self.headers['Host']}"
        objects = []
        for o in req["objects"]:
            item = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.state.lfs:  # already stored: no actions, the client skips
                item["authenticated"] = True
                item["actions"] = {"upload": {"href": f"{base}/lfs-objects/{o['oid']}"},
                                   "verify": {"href": f"{base}/lfs-verify/{o['oid']}"}}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects},
                   ctype="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        with self.state.lock:
            self.state.lfs_puts.append(oid)
        if self._fail("lfs_put"):
            return
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(400, {"error": "sha256 of the uploaded body does not match oid"})
        with self.state.lock:
            self.state.lfs[oid] = body
        self._send(200, {})

    def _commit(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        if not self._authorized() or self._fail("commit") or (repo := self._repo(repo_id)) is None:
            return
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._send(400, {"error": "commit payload must start with a header"})
        changes: dict[str, dict] = {}
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                changes[v["path"]] = {"mode": "regular", "data": base64.b64decode(v["content"])}
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.state.lfs:
                    return self._send(422, {"error": f"LFS object {v['oid']} was never "
                                                     f"uploaded ({v['path']})"})
                if len(self.state.lfs[v["oid"]]) != v.get("size", len(self.state.lfs[v["oid"]])):
                    return self._send(422, {"error": f"size mismatch for {v['path']}"})
                changes[v["path"]] = {"mode": "lfs", "oid": v["oid"]}
            else:
                return self._send(400, {"error": f"unsupported commit operation {item['key']}"})
        base = f"http://{self.headers['Host']}"
        with self.state.lock:
            if rev not in repo.branches:
                return self._send(400, {"error": f"Invalid rev id: {rev}"})
            target, pr_url = rev, None
            if query.get("create_pr") == ["1"]:
                repo.prs += 1
                target = f"refs/pr/{repo.prs}"
                repo.branches[target] = dict(repo.branches[rev])
                pr_url = f"{base}/{repo_id}/discussions/{repo.prs}"
            repo.branches[target].update(changes)
            oid = hashlib.sha1(body + str(len(repo.commits)).encode()).hexdigest()
            repo.commits.append({"oid": oid, "branch": target, "header": lines[0]["value"],
                                 "paths": sorted(changes)})
        self._send(200, {"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": pr_url, "success": True})


class StandInHub:
    """Run the stand-in Hub in a thread: ``with StandInHub(token) as hub: hub.url ...``."""

    def __init__(self, token: str, lfs_threshold: int = 10 << 20) -> None:
        self.state = HubState(token, lfs_threshold)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
