"""Device side of the TUF repository: verified targeting and verified release files.

Every check starts a fresh ``tuf.ngclient.Updater`` (it refreshes once per instance): root (walking
any key rotations), timestamp, snapshot, targets, then the delegated ``rollout`` role. Whatever
fails — a signature, an expiry (freeze), a version that went back (rollback), metadata from
different snapshots (mix-and-match), a length or hash (tampering, endless data) — becomes an
``UpdateRefused`` with a one-line reason, and the device stays on what it runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater

from .layout import MANIFEST
from .repository import desired_path, layout_path, release_path
from .tls import TlsFiles

_REASONS = [
    (tuf_errors.ExpiredMetadataError, "repository metadata expired (a frozen or stale mirror)"),
    (tuf_errors.BadVersionNumberError, "repository metadata went back to an older version (rollback)"),
    (tuf_errors.UnsignedMetadataError, "repository metadata is not signed by the trusted keys"),
    (tuf_errors.LengthOrHashMismatchError, "a downloaded file does not match its signed length or hash"),
    (tuf_errors.DownloadLengthMismatchError, "a download is longer than its signed length"),
    (tuf_errors.RepositoryError, "the repository's metadata is inconsistent"),
    (tuf_errors.DownloadError, "the repository cannot be reached"),
]


class UpdateRefused(RuntimeError):
    """The device does not take the update; ``str()`` is a one-line reason."""


def _refusal(error: Exception) -> UpdateRefused:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return UpdateRefused(f"{reason}: {error}")
    return UpdateRefused(f"{type(error).__name__}: {error}")


class PoolFetcher(FetcherInterface):
    """TUF's fetcher over one ``urllib3.PoolManager`` (HTTPS with the fleet's service CA and, where
    the server asks for one, the device's certificate); python-tuf's ``Urllib3Fetcher`` behaviour."""

    def __init__(self, http: urllib3.PoolManager, socket_timeout: float = 30.0, chunk_size: int = 400_000) -> None:
        self.http, self.socket_timeout, self.chunk_size = http, socket_timeout, chunk_size

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self.http.request(
                "GET", url, preload_content=False, timeout=urllib3.Timeout(self.socket_timeout)
            )
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.TimeoutError):
                raise tuf_errors.SlowRetrievalError from e
            raise tuf_errors.DownloadError(f"{url}: {e.reason}") from e
        if response.status >= 400:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"HTTP error occurred with status {response.status}", response.status)
        return self._chunks(response)

    def _chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from response.stream(self.chunk_size)
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_errors.SlowRetrievalError from e
        finally:
            response.release_conn()


class ReleaseClient:
    """Reads the fleet's repository at ``repo_url`` (``<url>/metadata/``, ``<url>/targets/``),
    keeping TUF's trusted metadata under ``state_dir/tuf``; over HTTPS with ``tls`` (the CA that
    checks the server, and the device's certificate if the server asks for client certificates)."""

    def __init__(
        self,
        repo_url: str,
        state_dir: str | os.PathLike,
        trusted_root: bytes,
        fetcher: FetcherInterface | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.repo_url = repo_url.rstrip("/")
        self.metadata_dir = Path(state_dir) / "tuf"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.trusted_root = trusted_root
        retries = urllib3.Retry(total=3, backoff_factor=0.5)
        context = tls.client_context() if tls is not None else None
        self.http = urllib3.PoolManager(retries=retries, ssl_context=context)
        self.fetcher = fetcher or (
            PoolFetcher(urllib3.PoolManager(retries=False, ssl_context=context)) if tls else None
        )
        self._updater: Updater | None = None

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (call once per check)."""
        cached = self.metadata_dir / "root.json"
        try:
            self._updater = Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=f"{self.repo_url}/metadata/",
                target_base_url=f"{self.repo_url}/targets/",
                fetcher=self.fetcher,
                # the newest root this device already verified, else the one it shipped with
                bootstrap=None if cached.exists() else self.trusted_root,
            )
            self._updater.refresh()
        except Exception as e:  # every TUF failure is a refusal with its reason
            self._updater = None
            raise _refusal(e) from e

    @property
    def updater(self) -> Updater:
        if self._updater is None:
            self.refresh()
        return self._updater  # type: ignore[return-value]

    def target(self, path: str) -> TargetFile | None:
        try:
            return self.updater.get_targetinfo(path)
        except UpdateRefused:
            raise
        except Exception as e:
            raise _refusal(e) from e

    def desired(self, ring: str) -> dict | None:
        """The release the rollout role wants ``ring`` to run (None: nothing targeted). The release
        must be one the offline targets key signed."""
        info = self.target(desired_path(ring))
        if info is None:
            return None
        try:
            document = json.loads(self.fetch(info))
        except ValueError as e:
            raise UpdateRefused(f"targeting for {ring} is not JSON: {e}") from e
        release = document.get("release") if isinstance(document, dict) else None
        if not isinstance(release, str) or self.target(release_path(release, MANIFEST)) is None:
            raise UpdateRefused(f"targeting for {ring} names release {release!r}, which no offline key signed")
        return document

    def ring(self, device_id: str) -> str:
        """This device's ring, from the ring layout the offline targets key signed
        (``layout/rings.json``; the online rollout role cannot sign that path)."""
        from .rings import RingError, check_layout, ring_of

        info = self.target(layout_path())
        if info is None:
            raise UpdateRefused("the repository has no ring layout signed by the offline key yet")
        try:
            return ring_of(device_id, check_layout(json.loads(self.fetch(info))))
        except (RingError, ValueError) as e:
            raise UpdateRefused(f"the signed ring layout is malformed: {e}") from e

    def release_file(self, release: str, name: str) -> TargetFile:
        info = self.target(release_path(release, name))
        if info is None:
            raise UpdateRefused(f"release {release} has no signed file {name}")
        return info

    def fetch(self, info: TargetFile) -> bytes:
        """A small signed file (targeting, a manifest), downloaded and verified (length, sha256)."""
        scratch = self.metadata_dir / ".fetch"
        try:
            self.updater.download_target(info, filepath=str(scratch))
            return scratch.read_bytes()
        except UpdateRefused:
            raise
        except Exception as e:
            raise _refusal(e) from e
        finally:
            scratch.unlink(missing_ok=True)

    def download_resumable(self, info: TargetFile, dest: str | os.PathLike) -> Path:
        """A large release file into ``dest`` through ``ota.download`` (resumes a partial file),
        checked against the signed length and sha256 from the verified metadata."""
        from .download import DownloadError, download

        url = f"{self.repo_url}/targets/{info.get_prefixed_paths()[0]}"
        try:
            return download(url, dest, info.length, info.hashes["sha256"], http=self.http)
        except DownloadError as e:
            raise UpdateRefused(str(e)) from e

    def download(self, info: TargetFile, dest: str | os.PathLike) -> Path:
        """A release file into ``dest``, verified against its signed length and sha256."""
        try:
            return Path(self.updater.download_target(info, filepath=str(dest)))
        except UpdateRefused:
            raise
        except Exception as e:
            raise _refusal(e) from e
