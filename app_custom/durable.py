"""Writes that survive a crash at any point: the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and a rename; ``mode`` (before the
    umask) is the new file's permission, e.g. 0o600 for secrets. The temporary file is always
    created afresh (a leftover is removed, a link never followed), so it never inherits a wider mode."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomic(path: Path, payload: dict, mode: int = 0o666) -> None:
    """``payload`` as JSON, written like ``write_bytes_atomic``."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True).encode(), mode)


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line and sync it: an audit line, once written, survives a crash."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def crash_trace(phase: str) -> None:
    """For the crash tests: with ``FLEETNEST_EDGE_TRACE=<file>`` set, note each phase a process enters
    (one line, not synced: a SIGKILL keeps the page cache), so a test can tell what it interrupted;
    ``FLEETNEST_EDGE_CRASH_AT=<phase>`` kills the process (SIGKILL) when it gets there."""
    path = os.environ.get("FLEETNEST_EDGE_TRACE")
    if path:
        import threading
        import time

        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {threading.current_thread().name} {phase}\n")
    if os.environ.get("FLEETNEST_EDGE_CRASH_AT") == phase:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
