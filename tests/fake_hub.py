"""A fake Hugging Face Hub and plain file server on 127.0.0.1, for running huggingface_hub's real download code.

Why: the download paths (`snapshot_download`, `hf_hub_download`, the expert file's Range resume) can only be trusted
when the real client talks to something that answers like the Hub: the same routes, headers and error shapes. This
module serves exactly what huggingface_hub 2.4 reads, on loopback only:

- `GET /api/models/{repo_id}[/revision/{rev}]`: the model info (`sha`, `siblings`; sizes and LFS info with `?blobs`);
- `GET /api/models/{repo_id}/tree/{rev}[/{path}]`: the tree listing `snapshot_download` uses (`?recursive=`), with
  no `xetHash`, so hf_xet is never asked to fetch anything;
- `HEAD|GET /{repo_id}/resolve/{rev}/{filename}`: a regular file answers 200 with `ETag` (its git blob id),
  `X-Repo-Commit`, `Content-Length`; an LFS file (by suffix, `LFS_SUFFIXES`) answers 302 with `Location` on a
  second loopback port (a "CDN": another origin, so the client does not follow the HEAD and reads `X-Linked-Etag`
  (sha256), `X-Linked-Size` and `X-Repo-Commit` off the redirect, as it does with the real Hub's CDN);
- file bodies (resolve, CDN, plain files) honour one `Range: bytes=a-b | a- | -n` (206 + `Content-Range`, 416 past
  the end);
- errors shaped like the Hub's: an unknown repo is 401 (404 with an `Authorization` header) with
  `X-Error-Code: RepoNotFound`, an unknown revision 404 `RevisionNotFound`, an unknown file 404 `EntryNotFound`
  (with `X-Repo-Commit`), each with `X-Error-Message` and a JSON `{"error": ...}` body;
- `add_file(path, data)`: a plain file at `url/path`, like raw.githubusercontent.com (plain 404 otherwise).

No xet headers are ever sent, so huggingface_hub downloads over plain HTTP (`http_get`). Every response closes its
connection, so `stop()` leaves nothing pooled that could still be answered.

Pointing huggingface_hub at it: `huggingface_hub.constants` is computed from the environment once, at import, and
the test session imports huggingface_hub (through transformers) long before a test runs; so setting `HF_ENDPOINT` /
`HF_HOME` / `HF_HUB_OFFLINE` alone does nothing. `hub_environment()` sets the variables (for code such as
`assistant.hub` that reads them) and patches the constants huggingface_hub reads at call time: `ENDPOINT` and
`HUGGINGFACE_CO_URL_TEMPLATE` (`hf_hub_url` formats the latter, built from the endpoint at import), the cache and
token paths, `HF_HUB_OFFLINE` (what `constants.is_offline_mode()` returns; the request hook raises
`OfflineModeIsEnabled` from it) and `HF_HUB_DISABLE_TELEMETRY` (else the user agent fetches
`{ENDPOINT}/api/agent-harnesses`). It also refuses, for the test, any connection or name look-up that is not
loopback.

`cut_after`: huggingface_hub's `http_get` resumes *within one call*: after a dropped connection
(`httpx2.RemoteProtocolError`) it sleeps 1 s and asks again with `Range: bytes=<received>-`, up to 5 times in a row
without progress. So the cut is a byte offset of the file, not a per-response budget: while it is set, no byte at or
past offset `cut_after` is ever sent (a body is cut there, then the connection closes; a range that starts there
gets its headers and a closed connection), and every retry fails until it is healed (`cut_after = None`). A failed
call deletes its partial file: the next call starts again from byte 0 (no resume across calls in 2.4).
`skip_retry_waits()` removes the 1 s waits and can heal the hub between tries.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub keeps in LFS (a subset of its default .gitattributes): served through the "CDN" redirect.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".model", ".npz")
CDN_PREFIX = "/__cdn__/"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        """The git blob id the Hub reports: of the file, or of its LFS pointer."""
        return _git_blob_id(self.pointer if self.lfs else self.data)


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, _File]


class FakeHub:
    """The fake Hub: started on construction (two loopback ports: the Hub and its "CDN"); a context manager."""

    def __init__(self) -> None:
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path without query, Range header)
        self._branches: dict[str, dict[str, _Commit]] = {}  # repo_id -> revision name -> commit
        self._commits: dict[str, dict[str, _Commit]] = {}  # repo_id -> sha -> commit
        self._plain: dict[str, bytes] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes, served by the CDN port
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        self._threads = [
            threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True, name="fake-hub")  # quick stop()
            for server in self._servers
        ]
        for thread in self._threads:
            thread.start()
        self._stopped = False

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Publish `files` as the commit `revision` points to (replacing what it pointed to); returns its sha."""
        entries = {path: _File(bytes(data), path.endswith(LFS_SUFFIXES)) for path, data in files.items()}
        listing = "\n".join(f"{path}\0{entry.blob_id}" for path, entry in sorted(entries.items()))
        sha = hashlib.sha1(f"{repo_id}\0{revision}\0{listing}".encode()).hexdigest()
        commit = _Commit(sha, entries)
        with self._lock:
            self._branches.setdefault(repo_id, {})[revision] = commit
            self._commits.setdefault(repo_id, {})[sha] = commit
            self._blobs.update({entry.sha256: entry.data for entry in entries.values() if entry.lfs})
        return sha

    def add_file(self, path: str, data: bytes) -> str:
        """Serve `data` at `url/path` (like raw.githubusercontent.com); returns that URL."""
        path = path.lstrip("/")
        with self._lock:
            self._plain[path] = bytes(data)
        return f"{self.url}/{path}"

    def stop(self) -> None:
        """Take both ports down: later connections are refused."""
        if self._stopped:
            return
        self._stopped = True
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # -- lookups (for the handler) --------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> bool:
        return repo_id in self._branches

    def _commit(self, repo_id: str, revision: str) -> _Commit | None:
        return self._branches[repo_id].get(revision) or self._commits[repo_id].get(revision)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self.close_connection = True
        split = urlsplit(self.path)
        raw, query = split.path, parse_qs(split.query)
        self.hub.requests.append((self.command, raw, self.headers.get("Range")))
        plain = self.hub._plain.get(unquote(raw).lstrip("/"))
        if plain is not None:
            return self._body(plain, {"ETag": f'"{_git_blob_id(plain)}"'})
        if raw.startswith(CDN_PREFIX):
            blob = self.hub._blobs.get(raw[len(CDN_PREFIX) :])
            if blob is None:
                return self._send(404, {}, b"Not Found")
            return self._body(blob, {"ETag": f'"{raw[len(CDN_PREFIX):]}"'})
        for pattern, answer in ((_TREE, self._tree), (_INFO, self._info), (_RESOLVE, self._resolve)):
            match = pattern.match(raw)
            if match:
                groups = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                return answer(query=query, **groups)
        self._send(404, {"Content-Type": "text/plain"}, b"404: Not Found")

    # -- Hub routes -----------------------------------------------------------------------------------------------

    def _find(self, repo: str, rev: str) -> _Commit | None:
        """The commit, or None after answering the Hub's 401/404."""
        if not self.hub._repo(repo):
            status = 404 if self.headers.get("Authorization") else 401
            self._error(status, "RepoNotFound", "Repository not found")
            return None
        commit = self.hub._commit(repo, rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _info(self, repo: str, query: dict[str, list[str]], rev: str = "main") -> None:
        commit = self._find(repo, rev)
        if commit is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(entry.data), blobId=entry.blob_id)
                if entry.lfs:
                    size, pointer = len(entry.data), len(entry.pointer)
                    sibling["lfs"] = {"sha256": entry.sha256, "size": size, "pointerSize": pointer}
            siblings.append(sibling)
        info = {
            "_id": commit.sha[:24],
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0] if "/" in repo else None,
            "sha": commit.sha,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(entry.data) for entry in commit.files.values()),
        }
        self._json(200, info)

    def _tree(self, repo: str, rev: str, query: dict[str, list[str]], path: str = "") -> None:
        commit = self._find(repo, rev)
        if commit is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(name.startswith(prefix) for name in commit.files):
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", commit.sha)
        entries: dict[str, dict[str, Any]] = {}
        for name, entry in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    oid = hashlib.sha1(f"tree {folder} {commit.sha}".encode()).hexdigest()
                    entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": len(entry.data), "path": name}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": len(entry.data), "pointerSize": len(entry.pointer)}
                entries[name] = item
        self._json(200, list(entries.values()))

    def _resolve(self, repo: str, rev: str, file: str, query: dict[str, list[str]]) -> None:
        commit = self._find(repo, rev)
        if commit is None:
            return
        entry = commit.files.get(file)
        if entry is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit.sha)
        headers = {"X-Repo-Commit": commit.sha}
        if not entry.lfs:
            return self._body(entry.data, {**headers, "ETag": f'"{entry.blob_id}"'})
        headers.update({
            "Location": f"{self.hub.cdn_url}{CDN_PREFIX}{entry.sha256}",
            "X-Linked-Etag": f'"{entry.sha256}"',
            "X-Linked-Size": str(len(entry.data)),
            "ETag": f'"{entry.blob_id}"',
        })
        self._send(302, headers, b"")

    # -- responses ------------------------------------------------------------------------------------------------

    def _body(self, data: bytes, headers: dict[str, str]) -> None:
        """A file's bytes, honouring one Range and the hub's `cut_after`."""
        size, start, end, status = len(data), 0, len(data), 200
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match and any(match.groups()):
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last) + 1, size) if last else size
            else:
                start, end = max(size - int(last), 0), size
            if start >= size or start >= end:
                return self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, b"")
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        cut = self.hub.cut_after
        sent_end = end if cut is None else max(start, min(end, cut))
        self._send(status, headers, data[start:sent_end])  # shorter than Content-Length when cut

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, {**(headers or {}), "Content-Type": "application/json"}, json.dumps(payload).encode())

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send a response, then close the connection (after fewer bytes than promised, for a cut transfer)."""
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
                self.wfile.flush()
            except OSError:  # the client went away
                pass


# -- helpers for tests ----------------------------------------------------------------------------------------------


def hub_environment(monkeypatch: Any, hub: FakeHub, home: Path) -> None:
    """Point huggingface_hub (and code reading the HF_* variables) at `hub`, online, with a fresh `home`.

    Sets HF_ENDPOINT, HF_HOME (cache: `home/hub`), HF_HUB_OFFLINE=0, HF_HUB_DISABLE_TELEMETRY=1 and unsets tokens
    and other cache variables; patches the `huggingface_hub.constants` read at call time (see the module docstring);
    and refuses any non-loopback connection or name look-up for the rest of the test. To go offline afterwards, set
    both `HF_HUB_OFFLINE=1` and `huggingface_hub.constants.HF_HUB_OFFLINE = True`.
    """
    from huggingface_hub import constants

    home = Path(home)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN",
                 "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    patched: dict[str, object] = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)  # raising: a renamed constant must fail loudly
    loopback_only(monkeypatch)


def loopback_only(monkeypatch: Any) -> None:
    """Until the test ends, a connection or name look-up beyond loopback raises AssertionError (not an OSError,
    which huggingface_hub would take for "offline" and hide)."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in _LOOPBACK:
            raise AssertionError(f"fake_hub: a test tried to connect to {address[0]} (loopback only)")
        return real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and str(host if not isinstance(host, bytes) else host.decode()) not in _LOOPBACK:
            raise AssertionError(f"fake_hub: a test tried to resolve {host!r} (loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class _Clock:
    """`time` for huggingface_hub's modules, with `sleep` replaced (everything else is the real module's)."""

    def __init__(self, on_wait: Callable[[float], None]) -> None:
        self._on_wait = on_wait

    def sleep(self, seconds: float) -> None:
        self._on_wait(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def skip_retry_waits(monkeypatch: Any, on_wait: Callable[[], None] | None = None) -> list[float]:
    """Make huggingface_hub's retry waits instant (`http_get`'s 1 s before resuming a dropped download, the
    backoff of `http_backoff`); `on_wait` runs in place of each (e.g. to heal the hub). Returns the list the
    requested waits (seconds) are appended to."""
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if on_wait is not None:
            on_wait()

    clock = _Clock(wait)
    monkeypatch.setattr(file_download, "time", clock)
    monkeypatch.setattr(_http, "time", clock)
    return waits
