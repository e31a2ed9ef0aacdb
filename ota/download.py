"""Resumable download of a signed file into ``<dest>.part``, then verified and renamed to ``dest``.

What is already in the partial file is kept across crashes and restarts: each chunk is written and
fsynced before the next is read, and a restart asks for the rest with a Range request, so an
interrupted download fetches at most the chunk that was in flight again. A server that ignores
Range (200) restarts the file from zero. Never more than the signed length is read (endless data),
and the file only takes its final name once its length and sha256 match the signed ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import urllib3

from .layout import file_sha256

CHUNK = 256 * 1024


class DownloadError(RuntimeError):
    """The file could not be fetched or does not match what was signed (the message says which)."""


def download(
    url: str,
    dest: str | os.PathLike,
    length: int,
    sha256: str,
    http: urllib3.PoolManager | None = None,
    chunk: int = CHUNK,
    timeout_s: float = 30.0,
) -> Path:
    """Fetch ``url`` into ``dest`` unless it is already there and verified; returns ``dest``."""
    dest = Path(dest)
    if dest.exists() and dest.stat().st_size == length and file_sha256(dest) == sha256:
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    http = http or urllib3.PoolManager(retries=urllib3.Retry(total=3, backoff_factor=0.5))
    if have < length:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = http.request(
                "GET", url, headers=headers, preload_content=False, timeout=urllib3.Timeout(total=None, read=timeout_s)
            )
        except urllib3.exceptions.HTTPError as e:
            raise DownloadError(f"{url}: {e}") from e
        try:
            if response.status == 200:
                have = 0  # the server sent the whole file
            elif response.status != 206:
                raise DownloadError(f"{url}: HTTP {response.status}")
            with open(part, "r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for block in response.stream(chunk):
                    if have + len(block) > length:
                        raise DownloadError(f"{url}: more than the signed {length} bytes (endless data)")
                    f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
                    have += len(block)
        except urllib3.exceptions.HTTPError as e:
            raise DownloadError(f"{url}: interrupted after {have} bytes ({e}); a retry resumes") from e
        finally:
            response.release_conn()
    if have != length:
        raise DownloadError(f"{url}: got {have} of {length} bytes; a retry resumes")
    if file_sha256(part) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: the file does not match its signed sha256 (tampered or corrupt); discarded")
    os.replace(part, dest)
    return dest
