"""The OTA server's timestamp keeper: renews the one-day TUF timestamp well before it expires.

``TimestampKeeper(repository, every_s).start()`` renews at once (before it returns), then every
``every_s`` seconds in a daemon thread, until ``stop()``. A failed renewal (a key that cannot be read, a full disk, the
repository lock held too long) is logged with its traceback and tried again after ``retry_s``,
doubling up to ``every_s``: the thread never dies of an error, because a keeper that stopped
silently would let the timestamp expire and every device refuse the repository as frozen a day
later. ``failures``, ``refreshes`` and ``last_error`` say how it goes (for tests and health checks).
"""

from __future__ import annotations

import logging
import threading

from .repository import Repository

log = logging.getLogger(__name__)


class TimestampKeeper:
    def __init__(self, repository: Repository, every_s: float = 6 * 3600, retry_s: float = 60.0) -> None:
        if not every_s > 0 or not retry_s > 0:
            raise ValueError(f"every_s and retry_s must be > 0, got {every_s} and {retry_s}")
        self.repository = repository
        self.every_s = every_s
        self.retry_s = min(retry_s, every_s)
        self.failures = 0
        self.refreshes = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh_once(self) -> bool:
        """One renewal; False (logged) when it failed."""
        try:
            self.repository.refresh_timestamp()
        except Exception as e:  # noqa: BLE001 - any failure is logged and retried, never fatal
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("timestamp refresh failed (%d so far) for %s", self.failures + 1, self.repository.path)
            self.failures += 1  # counted once logged: whoever sees the count finds the log line written
            return False
        self.refreshes += 1
        self.last_error = None
        return True

    def _run(self, wait: float) -> None:
        while not self._stop.wait(wait):
            if self.refresh_once():
                wait = self.every_s
            else:
                wait = self.retry_s if wait >= self.every_s else min(2 * wait, self.every_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> TimestampKeeper:
        wait = self.every_s if self.refresh_once() else self.retry_s
        self._thread = threading.Thread(target=self._run, args=(wait,), name="timestamp-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
