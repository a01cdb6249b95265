"""A small Hugging Face Hub on 127.0.0.1 for offline tests: the file endpoints huggingface_hub calls.

Serves, for model repos added with :meth:`FakeHub.add_repo`:

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` with the Hub's headers: ``X-Repo-Commit``,
  ``ETag`` (the sha256 of the content for LFS files, the git blob sha1 for small ones, as the Hub does),
  ``Content-Length``, ``Accept-Ranges`` and ``206`` answers to ``Range: bytes=N-``; a missing file is a
  404 with ``X-Error-Code: EntryNotFound``;
- ``GET /api/models/{repo_id}/revision/{revision}`` (repo info) and ``/api/models/{repo_id}/tree/...``
  (the listing ``snapshot_download`` reads);

and plain files at ``/files/{name}`` (no Hub headers, ranges supported) for URL sources. Faults:
:meth:`cut_once` drops the connection after N bytes of the next full GET of a path (an interrupted
download), ``FakeHub.bad_etag`` advertises a wrong sha256 for a path. Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    """``with FakeHub() as hub: hub.endpoint`` -> ``http://127.0.0.1:PORT``."""

    LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.files: dict[str, bytes] = {}  # /files/<name>
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.bad_etag: set[str] = set()  # request paths whose ETag lies
        self._cuts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ content
    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = dict(files)

    def add_file(self, name: str, data: bytes) -> str:
        """A plain file; returns its URL."""
        self.files[name] = data
        return f"{self.endpoint}/files/{name}"

    def cut_once(self, path: str, after: int) -> None:
        """Drop the connection after ``after`` body bytes of the next full GET of ``path``."""
        self._cuts[path] = after

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def etag(self, path: str, data: bytes) -> str:
        if path in self.bad_etag:
            return hashlib.sha256(b"not " + data).hexdigest()
        if path.endswith(self.LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return git_blob_sha1(data)

    def downloads(self, suffix: str) -> list[tuple[str, str | None]]:
        """``(path, Range)`` of the GETs of paths ending with ``suffix``."""
        return [(p, r) for m, p, r in self.requests if m == "GET" and p.endswith(suffix)]

    # ------------------------------------------------------------------ server
    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ handlers
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        with self._lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            return self._api(h, m.group(1), m.group(2), (m.group(4) or "").strip("/"))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo_id, filename = m.group(1), m.group(3)
            if repo_id not in self.repos:
                return self._error(h, 401, "RepoNotFound", f"Repository {repo_id} not found")
            headers = {"X-Repo-Commit": self.commit(repo_id)}
            data = self.repos[repo_id].get(filename)
            if data is None:
                return self._error(h, 404, "EntryNotFound", f"{filename} not found", headers)
            headers["ETag"] = f'"{self.etag(path, data)}"'
            return self._send(h, path, data, body, headers)
        m = re.fullmatch(r"/files/(.+)", path)
        if m and m.group(1) in self.files:
            return self._send(h, path, self.files[m.group(1)], body, {})
        return self._error(h, 404, "EntryNotFound", "not found")

    def _api(self, h: BaseHTTPRequestHandler, repo_id: str, kind: str, sub: str) -> None:
        if repo_id not in self.repos:
            return self._error(h, 401, "RepoNotFound", f"Repository {repo_id} not found")
        files = self.repos[repo_id]
        if kind == "revision":
            info = {
                "id": repo_id,
                "sha": self.commit(repo_id),
                "siblings": [{"rfilename": p} for p in files],
            }
        else:
            info = []
            for p, data in files.items():
                if sub and not p.startswith(sub + "/"):
                    continue
                entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                if p.endswith(self.LFS_SUFFIXES):
                    sha256 = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
                info.append(entry)
        payload = json.dumps(info).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _error(self, h, status: int, code: str, message: str, headers: dict | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        h.send_response(status)
        for k, v in {**(headers or {}), "X-Error-Code": code, "X-Error-Message": message}.items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _send(self, h, path: str, data: bytes, body: bool, headers: dict) -> None:
        start = 0
        rng = h.headers.get("Range")
        if rng and body:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng.strip()).group(1))
        part = data[start:]
        h.send_response(206 if start else 200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(part)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        cut = self._cuts.pop(path, None) if not start else None
        if cut is not None:
            h.wfile.write(part[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the peer sees the body end early
            return
        h.wfile.write(part)
