"""The OTA HTTP server: serves a repository folder (TUF metadata and release files) with Range requests.

GET and HEAD only; one byte range per request (``Range: bytes=a-b``, ``a-``, ``-n``) answered with
206 and ``Content-Range``, an unsatisfiable range with 416. Nothing outside the folder is served
(no ``..``, no symlinks out, no dot files: temporaries and staging stay private). TUF metadata
must not be cached by proxies (``no-cache``); consistent-snapshot files are immutable. Any static
server with Range support (nginx, a CDN) can serve the same folder instead.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
import time
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RepositoryHandler(http.server.BaseHTTPRequestHandler):
    server_version = "fleetnest-ota"
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, root: Path, max_bytes_per_s: float | None, stats: dict, **kwargs) -> None:
        self.root = root
        self.max_bytes_per_s = max_bytes_per_s
        self.stats = stats
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def _resolve(self) -> Path | None:
        path = unquote(urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if any(p.startswith(".") for p in parts):
            return None
        candidate = (self.root / "/".join(parts)).resolve()
        if not candidate.is_file() or self.root not in candidate.parents:
            return None
        return candidate

    def _range(self, size: int) -> tuple[int, int] | None | str:
        header = self.headers.get("Range")
        if header is None:
            return None
        match = _RANGE.match(header.strip())
        if not match or match.groups() == ("", ""):
            return "bad"
        first, last = match.groups()
        if first == "":  # the last n bytes
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(size - 1, int(last)) if last else size - 1
        if start >= size or start > end:
            return "bad"
        return start, end

    def _headers(self, status: int, length: int, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()

    def _serve(self, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self._headers(404, 0, {})
            return
        size = path.stat().st_size
        kind = {"Content-Type": "application/json" if path.suffix == ".json" else "application/octet-stream"}
        # the timestamp and unversioned files change; consistent-snapshot names never do
        kind["Cache-Control"] = "no-cache" if path.parent.name == "metadata" else "public, max-age=31536000, immutable"
        wanted = self._range(size)
        if wanted == "bad":
            self._headers(416, 0, {"Content-Range": f"bytes */{size}"})
            return
        if wanted is None:
            start, end, status = 0, size - 1, 200
        else:
            (start, end), status = wanted, 206  # type: ignore[misc]
            kind["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._headers(status, end - start + 1, kind)
        if not body:
            return
        sent, began = 0, time.monotonic()
        with open(path, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
                remaining -= len(chunk)
                with self.server.stats_lock:  # type: ignore[attr-defined]
                    self.stats["bytes_sent"] = self.stats.get("bytes_sent", 0) + len(chunk)
                if self.max_bytes_per_s:
                    ahead = sent / self.max_bytes_per_s - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        with self.server.stats_lock:  # type: ignore[attr-defined]
            self.stats["requests"] = self.stats.get("requests", 0) + 1

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        # a client that goes away mid-transfer resumes later with a Range request
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)


class RepositoryServer:
    """``with RepositoryServer(folder) as server: server.url`` — a threaded server on localhost."""

    def __init__(
        self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, max_bytes_per_s: float | None = None
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder")
        self.stats: dict = {}
        handler = partial(RepositoryHandler, root=self.root, max_bytes_per_s=max_bytes_per_s, stats=self.stats)
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.stats_lock = threading.Lock()  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RepositoryServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RepositoryServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
