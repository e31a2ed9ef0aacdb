"""When a device may learn: micro-updates run only while it is idle and charging, each within a
time budget, and stop at once when either condition goes away.

Probes read the conditions:

- ``JetsonProbe`` reads sysfs: ``/sys/class/power_supply/*`` (a ``Mains`` or ``USB`` supply that
  is ``online``, or a battery whose ``status`` is ``Charging`` or ``Full``), the GPU load in
  per-mille (``/sys/devices/platform/gpu.0/load`` on Xavier, ``.../17000000.gpu/load`` on Orin)
  and the one-minute load average per core. A Jetson developer kit on a barrel jack exposes no
  power supply at all; ``no_supply`` says what to assume then (``mains`` by default; a robot on a
  battery that sysfs does not report should say ``battery``).
- ``FileProbe`` reads ``{"idle": true, "charging": true}`` from a file: for tests, simulation, or a
  robot whose mission software knows better than sysfs. A missing or malformed file reads as busy.

Every failure to read reads as *busy*: a device never learns because a probe broke.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GPU_LOAD_FILES = (
    "devices/platform/gpu.0/load",  # Xavier, JetPack 5
    "devices/platform/bus@0/17000000.gpu/load",  # Orin, JetPack 6
    "devices/gpu.0/load",
    "devices/platform/17000000.ga10b/load",  # older Orin kernels
)


@dataclass(frozen=True)
class Conditions:
    idle: bool
    charging: bool
    why: str  # what the probe saw, for the status line and the log

    @property
    def may_learn(self) -> bool:
        return self.idle and self.charging


class FileProbe:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> Conditions:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Conditions(False, False, f"probe file {self.path} is missing: treated as busy")
        except (OSError, ValueError) as err:
            return Conditions(False, False, f"probe file {self.path} is unreadable ({err}): treated as busy")
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), bool) for k in ("idle", "charging")):
            return Conditions(False, False, f"probe file {self.path} needs boolean idle and charging: treated as busy")
        return Conditions(raw["idle"], raw["charging"], f"idle={raw['idle']} charging={raw['charging']} (file)")


class JetsonProbe:
    def __init__(
        self,
        sysfs: str | Path = "/sys",
        proc: str | Path = "/proc",
        gpu_idle_permille: int = 200,
        cpu_idle_load: float = 0.5,
        no_supply: str = "mains",
        cpus: int | None = None,
    ) -> None:
        if no_supply not in ("mains", "battery"):
            raise ValueError(f"no_supply must be 'mains' or 'battery', got {no_supply!r}")
        self.sysfs, self.proc = Path(sysfs), Path(proc)
        self.gpu_idle_permille, self.cpu_idle_load, self.no_supply = gpu_idle_permille, cpu_idle_load, no_supply
        self.cpus = cpus or os.cpu_count() or 1

    def _charging(self) -> tuple[bool, str]:
        supplies = sorted(glob.glob(str(self.sysfs / "class" / "power_supply" / "*")))
        if not supplies:
            return self.no_supply == "mains", f"no power supply in sysfs ({self.no_supply} assumed)"
        seen = []
        for supply in map(Path, supplies):
            kind = _read(supply / "type")
            if kind in ("Mains", "USB", "USB_PD", "USB_C") and _read(supply / "online") == "1":
                return True, f"{supply.name} ({kind}) online"
            status = _read(supply / "status")
            if kind == "Battery" and status in ("Charging", "Full"):
                return True, f"{supply.name} {status.lower()}"
            seen.append(f"{supply.name}={kind or '?'}:{status or _read(supply / 'online') or '?'}")
        return False, "not charging (" + ", ".join(seen) + ")"

    def _idle(self) -> tuple[bool, str]:
        try:
            load = float(_read(self.proc / "loadavg").split()[0]) / self.cpus
        except (IndexError, ValueError):
            return False, "cannot read /proc/loadavg: treated as busy"
        notes = [f"cpu load {load:.2f}/core"]
        idle = load <= self.cpu_idle_load
        for name in GPU_LOAD_FILES:
            text = _read(self.sysfs / name)
            if text.isdigit():
                notes.append(f"gpu {int(text) / 10:.0f}%")
                idle = idle and int(text) <= self.gpu_idle_permille
                break
        return idle, ", ".join(notes)

    def read(self) -> Conditions:
        charging, power = self._charging()
        idle, load = self._idle()
        return Conditions(idle, charging, f"{load}; {power}")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def make_probe(spec: dict) -> FileProbe | JetsonProbe:
    """A probe from the daemon's ``learning.probe`` setting (validated by ``EdgeConfig``)."""
    if spec["kind"] == "file":
        return FileProbe(spec["path"])
    return JetsonProbe(no_supply=spec.get("no_supply", "mains"))


class MicroUpdateGate:
    """Whether a micro-update may start, and, while it runs, whether it must stop now."""

    def __init__(
        self,
        probe: FileProbe | JetsonProbe,
        budget_s: float,
        min_interval_s: float = 0.0,
        recheck_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe, self.budget_s, self.min_interval_s, self.recheck_s = probe, budget_s, min_interval_s, recheck_s
        self._clock = clock
        self._last_end: float | None = None
        self.last: Conditions | None = None

    def may_start(self) -> tuple[bool, str]:
        now = self._clock()
        if self._last_end is not None and now - self._last_end < self.min_interval_s:
            return False, f"next micro-update in {self.min_interval_s - (now - self._last_end):.0f} s"
        self.last = self.probe.read()
        if not self.last.may_learn:
            return False, f"no micro-update: {self.last.why}"
        return True, self.last.why

    def watch(self, stop: Callable[[], bool] = lambda: False) -> Callable[[], str | None]:
        """A check for one micro-update: None while it may go on, else why it must stop."""
        started = self._clock()
        checked = started

        def should_stop() -> str | None:
            nonlocal checked
            now = self._clock()
            if stop():
                return "the daemon is stopping"
            if now - started > self.budget_s:
                return f"time budget of {self.budget_s:.0f} s used up"
            if now - checked >= self.recheck_s:
                checked = now
                self.last = self.probe.read()
                if not self.last.may_learn:
                    return self.last.why
            return None

        return should_stop

    def finished(self) -> None:
        self._last_end = self._clock()
