"""The edge daemon's configuration (``/etc/fleetnest/edge.yaml``), validated with errors that name
the field, the value and what was expected."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the common name of its certificate


class EdgeConfigError(ValueError):
    """A configuration the daemon cannot run with; the message says which field and why."""


@dataclass(frozen=True)
class EdgeConfig:
    device_id: str
    state_dir: Path  # under systemd: $STATE_DIRECTORY (/var/lib/fleetnest)
    loop_interval_s: float = 1.0  # one pass of the main loop at least this often

    @classmethod
    def from_dict(cls, raw: object, where: str = "edge config") -> EdgeConfig:
        if not isinstance(raw, dict):
            raise EdgeConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in {"device_id", "state_dir", "loop_interval_s"})
        if unknown:
            raise EdgeConfigError(f"{where}: unknown settings {unknown}")
        for name in ("device_id", "state_dir"):
            if name not in raw:
                raise EdgeConfigError(f"{where}: {name} is required")
        device = raw["device_id"]
        if not isinstance(device, str) or not DEVICE_ID.match(device):
            raise EdgeConfigError(f"{where}: device_id {device!r}: letters, digits, '.', '_' and '-', at most 64")
        state = raw["state_dir"]
        if not isinstance(state, str) or not state.startswith("/"):
            raise EdgeConfigError(f"{where}: state_dir must be an absolute path, got {state!r}")
        interval = raw.get("loop_interval_s", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not math.isfinite(interval):
            raise EdgeConfigError(f"{where}: loop_interval_s must be a number, got {interval!r}")
        if not 0.01 <= interval <= 60:
            raise EdgeConfigError(f"{where}: loop_interval_s must be in [0.01, 60] seconds, got {interval}")
        return cls(device, Path(state), float(interval))

    @classmethod
    def load(cls, path: str | Path) -> EdgeConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise EdgeConfigError(f"cannot read {path}: {err}") from err
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise EdgeConfigError(f"{path} is not valid YAML: {err}") from err
        return cls.from_dict(raw, str(path))
