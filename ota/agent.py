"""A device's OTA loop: an update cycle whenever its ring's targeting changes (MQTT hint) or every
``poll_s`` seconds (the fallback when MQTT is unavailable), and a report of each outcome: at once
when it changed, else again at most every ``repeat_s`` (a rollout server that missed it hears it
again; the server counts a device once and rate-limits it, ``ota.reports``)."""

from __future__ import annotations

import threading
import time

from .mqtt import DeviceLink
from .updater import Outcome, Updater

# what the rollout controller counts: a device on the release, or one that failed it for good
REPORTED = {"installed": "installed", "up-to-date": "installed", "refused": "refused", "rolled-back": "rolled-back"}


class DeviceAgent:
    def __init__(
        self,
        device: str,
        ring: str,
        updater: Updater,
        link: DeviceLink | None,
        poll_s: float = 30.0,
        repeat_s: float = 30.0,
    ):
        self.device, self.ring, self.updater, self.link, self.poll_s = device, ring, updater, link, poll_s
        self.repeat_s = repeat_s
        self.outcomes: list[Outcome] = []
        self._sent: tuple[dict, float] | None = None

    def cycle(self) -> Outcome:
        outcome = self.updater.run_once()
        self.outcomes.append(outcome)
        status = REPORTED.get(outcome.status)
        if self.link is not None and status is not None and outcome.release is not None:
            report = {"device": self.device, "ring": self.ring, "release": outcome.release, "status": status}
            now = time.monotonic()
            if self._sent is None or self._sent[0] != report or now - self._sent[1] >= self.repeat_s:
                self.link.report(report | {"reason": outcome.reason})
                self._sent = (report, now)
        return outcome

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.link is not None:
                self.link.hint.clear()
            try:
                self.cycle()
            except Exception as e:  # the loop outlives one bad cycle; the next one retries
                self.outcomes.append(Outcome("unavailable", None, f"{type(e).__name__}: {e}"))
            deadline = time.monotonic() + self.poll_s
            while not stop.is_set() and time.monotonic() < deadline:
                if self.link is not None and self.link.hint.is_set():
                    break
                stop.wait(0.05)
