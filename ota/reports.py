"""Which device reports a rollout may count: ``ReportGate.admit(sender, body)``.

``sender`` is the device the transport authenticated: over MQTT, the device segment of the topic
``<prefix>/report/<device>``, which the broker's ACL (``pattern write <prefix>/report/%u``, the user
name being the common name of the device's certificate) lets only that device write. A report is
admitted only when

1. the body is a well-formed report (``device``, ``ring``, ``release``, ``status``, ``reason``);
2. it names the device that sent it (``device == sender``): a device cannot report for another;
3. the device is enrolled, when the gate is given the fleet's enrolment (issued and not revoked);
4. the ring it names is the ring the signed ring layout (offline key) places it in: a device cannot
   count in a ring it does not belong to;
5. the device has not sent more than ``max_reports`` in the last ``window_s`` seconds.

Otherwise ``ReportRefused`` says why, and the caller counts it nowhere. Repeated reports of one
device count once anyway (the controller keeps one row per device and rollout); the rate limit
bounds the work and the log a misbehaving device can cause.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app_custom.device_identity import DEVICE_ID

from .rings import RingError, ring_of

HEALTHY = "installed"
FAILED = ("rolled-back", "refused")
FIELDS = {"device", "ring", "release", "status", "reason"}
MAX_REASON = 500


class ReportRefused(ValueError):
    """A report that does not count (the message says why)."""


@dataclass(frozen=True)
class DeviceReport:
    device: str
    ring: str
    release: str
    status: str
    reason: str = ""

    @classmethod
    def parse(cls, body: object) -> DeviceReport:
        if not isinstance(body, dict):
            raise ReportRefused(f"a report is a JSON object, got {type(body).__name__}")
        unknown = sorted(str(k) for k in body if k not in FIELDS)
        if unknown:
            raise ReportRefused(f"unknown report fields {unknown}")
        values = {}
        for name in ("device", "ring", "release", "status"):
            value = body.get(name)
            if not isinstance(value, str) or not value or len(value) > 128:
                raise ReportRefused(f"report field {name!r} must be a string of 1 to 128 characters, got {value!r}")
            values[name] = value
        if not DEVICE_ID.match(values["device"]):
            raise ReportRefused(f"{values['device']!r} is not a device id")
        if values["status"] not in (HEALTHY, *FAILED):
            raise ReportRefused(f"status {values['status']!r} is none of {[HEALTHY, *FAILED]}")
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise ReportRefused("report field 'reason' must be a string")
        return cls(**values, reason=reason[:MAX_REASON])


class ReportGate:
    def __init__(
        self,
        layout: Callable[[], dict | None],
        enrolled: Callable[[str], bool] | None = None,
        max_reports: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``layout()``: the ring layout the offline targets key signed (None: none yet);
        ``enrolled(device)``: whether the fleet knows the device (None: every authenticated device)."""
        if max_reports < 1 or not window_s > 0:
            raise ValueError(f"max_reports must be >= 1 and window_s > 0, got {max_reports} and {window_s}")
        self.layout, self.enrolled = layout, enrolled
        self.max_reports, self.window_s, self.clock = max_reports, window_s, clock
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, sender: str | None, body: object) -> DeviceReport:
        """The report, if it may count; ``ReportRefused`` otherwise."""
        if not sender or not DEVICE_ID.match(sender):
            raise ReportRefused(f"not from an authenticated device (sender {sender!r})")
        report = DeviceReport.parse(body)
        if report.device != sender:
            raise ReportRefused(f"{sender} sent a report naming device {report.device!r}")
        if self.enrolled is not None and not self.enrolled(sender):
            raise ReportRefused(f"{sender} is not an enrolled device of this fleet")
        layout = self.layout()
        if layout is None:
            raise ReportRefused("no signed ring layout to place the device with")
        try:
            ring = ring_of(sender, layout)
        except RingError as e:
            raise ReportRefused(str(e)) from e
        if report.ring != ring:
            raise ReportRefused(f"{sender} claims ring {report.ring!r}; the signed layout places it in {ring!r}")
        self._count(sender)
        return report

    def _count(self, device: str) -> None:
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(device, deque())
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            if len(recent) >= self.max_reports:
                raise ReportRefused(f"{device} sent more than {self.max_reports} reports in {self.window_s:g} s")
            recent.append(now)
            if len(self._recent) > 100_000:  # forget devices quiet for a whole window
                for name in [d for d, times in self._recent.items() if not times or times[-1] <= now - self.window_s]:
                    del self._recent[name]


class Enrolment:
    """The devices the fleet's device CA issued a certificate to that is not revoked, read from its
    records (``issued.json``, ``revoked.json``; no private key needed) and re-read when they change."""

    def __init__(self, device_ca_dir: str | os.PathLike) -> None:
        self.dir = Path(device_ca_dir)
        if not (self.dir / "ca.pem").is_file():
            raise ValueError(f"{self.dir} holds no device CA (ca.pem)")
        self._stamp: tuple | None = None
        self._devices: set[str] = set()
        self._lock = threading.Lock()

    def _read(self, name: str) -> list[dict]:
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else []

    def __call__(self, device: str) -> bool:
        with self._lock:
            stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in self._files())
            if stamp != self._stamp:
                revoked = {str(r["serial"]) for r in self._read("revoked.json")}
                self._devices = {r["device_id"] for r in self._read("issued.json") if str(r["serial"]) not in revoked}
                self._stamp = stamp
            return device in self._devices

    def _files(self) -> list[Path]:
        return [self.dir / "issued.json", self.dir / "revoked.json"]
