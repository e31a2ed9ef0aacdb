"""The OTA HTTP server: serves a repository folder (TUF metadata and release files) with Range requests.

GET and HEAD only; one byte range per request (``Range: bytes=a-b``, ``a-``, ``-n``) answered with
206 and ``Content-Range``, an unsatisfiable range with 416. Nothing outside the folder is served
(no ``..``, no symlinks out, no dot files: temporaries and staging stay private). TUF metadata
must not be cached by proxies (``no-cache``); consistent-snapshot files are immutable. Any static
server with Range support (nginx, a CDN) can serve the same folder instead.

What a client cannot do to it: hold a connection (or a TLS handshake) open without sending: every
socket read and write times out after ``idle_timeout_s`` and the connection is closed; open more
than ``max_connections`` at once (the rest are closed at once); make a handler fail with a path
(a NUL, bad percent-encoding, bytes that are not UTF-8, an overlong path: 400; anything else not
served: 404). With ``tls`` (an ``ssl.SSLContext``, see ``ota.tls``) it serves HTTPS.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import ssl
import threading
import time
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_PATH = 1024  # the longest repository path is far shorter (targets/releases/<release>/<sha256>.<file>)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class BadPath(ValueError):
    """A request path that cannot name a file (the message says why): answered with 400."""


def repository_path(raw: str) -> list[str]:
    """The path segments a request names, or ``BadPath``: too long, bad percent-encoding, not UTF-8,
    a NUL or another control character."""
    path = urlsplit(raw).path
    if len(path) > MAX_PATH:
        raise BadPath(f"path longer than {MAX_PATH} characters")
    if _BAD_ESCAPE.search(path):
        raise BadPath("invalid percent-encoding")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError as e:
        raise BadPath(f"not UTF-8 once decoded ({e.reason})") from e
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise BadPath("a NUL or control character")
    return [p for p in decoded.split("/") if p]


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
        parts = repository_path(self.path)
        if any(p.startswith(".") for p in parts):
            return None
        try:
            candidate = (self.root / "/".join(parts)).resolve()
            if not candidate.is_file() or self.root not in candidate.parents:
                return None
        except (OSError, ValueError):  # a name too long for the file system, and the like
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
        try:
            path = self._resolve()
        except BadPath as e:
            log.info("400 for %s: %s", self.client_address[0], e)
            self.close_connection = True
            self._headers(400, 0, {})
            return
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
        # a client that goes away (or stalls) mid-transfer resumes later with a Range request
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            self._serve(body=False)


class _BoundedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; the TLS handshake runs in the
    connection's thread under the idle timeout, never in the accepting one."""

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog (socketserver: 5): connection bursts wait, not retry

    def __init__(self, address, handler, idle_timeout_s: float, max_connections: int, tls: ssl.SSLContext | None):
        self.idle_timeout_s = idle_timeout_s
        self.tls = tls
        self.errors: list[str] = []
        self.stats_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("connection from %s closed: the server holds its most connections already", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:
        request.settimeout(self.idle_timeout_s)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:  # no or a wrong certificate, a stalled handshake
            log.info("TLS handshake with %s failed: %s", client_address[0], e)
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            self.shutdown_request(wrapped)

    def handle_error(self, request, client_address) -> None:
        # a handler that raised: recorded (and logged) instead of printed to stderr
        import traceback

        text = traceback.format_exc()
        self.errors.append(text)
        log.error("unhandled error serving %s:\n%s", client_address[0], text)


class RepositoryServer:
    """``with RepositoryServer(folder) as server: server.url`` — a threaded server on localhost."""

    def __init__(
        self,
        root: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        max_bytes_per_s: float | None = None,
        idle_timeout_s: float = 30.0,
        max_connections: int = 256,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder")
        if not idle_timeout_s > 0 or max_connections < 1:
            raise ValueError(
                f"idle_timeout_s must be > 0 and max_connections >= 1, got {idle_timeout_s}, {max_connections}"
            )
        self.stats: dict = {}
        handler = partial(RepositoryHandler, root=self.root, max_bytes_per_s=max_bytes_per_s, stats=self.stats)
        self.httpd = _BoundedServer((host, port), handler, idle_timeout_s, max_connections, tls)
        self._thread: threading.Thread | None = None

    @property
    def errors(self) -> list[str]:
        """Tracebacks of handlers that raised (none, unless there is a bug)."""
        return self.httpd.errors

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        scheme = "https" if self.httpd.tls is not None else "http"
        return f"{scheme}://{host}:{port}"

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
