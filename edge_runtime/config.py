"""The edge daemon's configuration (``/etc/fleetnest/edge.yaml``), validated with errors that name
the field, the value and what was expected.

Only ``device_id`` and ``state_dir`` are required; each optional section switches a part on:

- ``sensor``: where samples come from (``fn: "module:function"`` returning an iterator of
  ``(inputs, label)``; ``kwargs``; ``rate_hz``): inference runs on every sample;
- ``learning``: continual learning on a bounded sample store (needs ``sensor``);
- ``inference``: the latency budget and the monitor's window;
- ``fleet``: the hierarchy's device client (needs ``learning``);
- ``ota``: the signed OTA updater;
- ``telemetry``: MQTT presence, health and metrics, and the localhost Prometheus endpoint.

``ota`` and ``telemetry`` take TLS settings: ``ca_file`` (the fleet's service CA, which checks the
OTA server and the broker), ``cert_file`` and ``key_file`` (the device's certificate and key from the
device CA: the broker's ACL knows the device by it). MQTT runs over TLS as soon as one is set.

The annotated example is ``edge_runtime/systemd/edge.yaml.example``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the common name of its certificate
FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_BUDGET_S = 180.0  # a micro-update never holds the device longer than this

# section -> setting -> (default, check); a default of ``...`` marks a required setting
_number = (int, float)
SECTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "sensor": {
        "fn": (..., "function"),
        "kwargs": ({}, dict),
        "rate_hz": (10.0, (0.1, 1000.0)),
    },
    "learning": {
        "job_config": (..., "absolute"),
        "num_classes": (..., (2, 100_000)),
        "capacity": (512, (8, 1_000_000)),
        "eviction": ("oldest", ("oldest", "least-useful")),
        "steps": (20, (1, 100_000)),
        "min_samples": (32, (2, 1_000_000)),
        "budget_s": (120.0, (1.0, MAX_BUDGET_S)),
        "min_interval_s": (60.0, (0.0, 86_400.0)),
        "probe": ({"kind": "jetson"}, "probe"),
    },
    "inference": {
        "latency_budget_ms": (30.0, (0.1, 10_000.0)),
        "window": (200, (20, 100_000)),
    },
    "fleet": {
        "proxy": (..., "url"),
        "identity": (..., "absolute"),
        "job": ("nested_fleet", str),
    },
    "ota": {
        "repository": (..., "url"),
        "root": (..., "absolute"),
        "device_class": (..., str),
        "ring": (None, str),
        "poll_s": (30.0, (0.1, 86_400.0)),
        "ca_file": (None, "absolute"),
        "cert_file": (None, "absolute"),
        "key_file": (None, "absolute"),
    },
    "telemetry": {
        "mqtt_host": (None, str),
        "mqtt_port": (1883, (1, 65535)),
        "prefix": ("fleetnest", str),
        "buffer": (500, (1, 1_000_000)),
        "interval_s": (10.0, (0.1, 3600.0)),
        "metrics_port": (0, (0, 65535)),  # 0: no /metrics endpoint
        "ca_file": (None, "absolute"),
        "cert_file": (None, "absolute"),
        "key_file": (None, "absolute"),
    },
}


class EdgeConfigError(ValueError):
    """A configuration the daemon cannot run with; the message says which field and why."""


def _check(where: str, name: str, value: Any, check: Any) -> Any:
    if check == "function":
        if not isinstance(value, str) or not FUNCTION.match(value):
            raise EdgeConfigError(f"{where}.{name}: expected 'module:function', got {value!r}")
    elif check == "absolute":
        if not isinstance(value, str) or not value.startswith("/"):
            raise EdgeConfigError(f"{where}.{name} must be an absolute path, got {value!r}")
    elif check == "url":
        if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
            raise EdgeConfigError(f"{where}.{name}: expected an http(s) URL, got {value!r}")
    elif check == "probe":
        value = _probe(f"{where}.{name}", value)
    elif isinstance(check, tuple) and isinstance(check[0], str):
        if value not in check:
            raise EdgeConfigError(f"{where}.{name}: one of {list(check)}, got {value!r}")
    elif isinstance(check, tuple):
        low, high = check
        if isinstance(value, bool) or not isinstance(value, _number) or not math.isfinite(value):
            raise EdgeConfigError(f"{where}.{name} must be a number, got {value!r}")
        if isinstance(low, int) and isinstance(high, int) and not isinstance(value, int):
            raise EdgeConfigError(f"{where}.{name} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise EdgeConfigError(f"{where}.{name} must be in [{low}, {high}], got {value}")
    elif not isinstance(value, check):
        raise EdgeConfigError(f"{where}.{name}: expected {check.__name__}, got {value!r}")
    return value


def _probe(where: str, raw: Any) -> dict:
    if not isinstance(raw, dict) or raw.get("kind") not in ("jetson", "file"):
        raise EdgeConfigError(f"{where}: expected {{kind: jetson}} or {{kind: file, path: /...}}, got {raw!r}")
    allowed = {"kind", "no_supply"} if raw["kind"] == "jetson" else {"kind", "path"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise EdgeConfigError(f"{where}: unknown settings {unknown}")
    if raw["kind"] == "file":
        _check(where, "path", raw.get("path"), "absolute")
    elif raw.get("no_supply", "mains") not in ("mains", "battery"):
        raise EdgeConfigError(f"{where}.no_supply: 'mains' or 'battery', got {raw.get('no_supply')!r}")
    return dict(raw)


def _section(where: str, raw: Any, spec: dict[str, tuple[Any, Any]]) -> dict:
    if not isinstance(raw, dict):
        raise EdgeConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in spec)
    if unknown:
        raise EdgeConfigError(f"{where}: unknown settings {unknown}")
    out = {}
    for name, (default, check) in spec.items():
        if name not in raw:
            if default is ...:
                raise EdgeConfigError(f"{where}.{name} is required")
            out[name] = default
            continue
        out[name] = _check(where, name, raw[name], check)
    return out


@dataclass(frozen=True)
class EdgeConfig:
    device_id: str
    state_dir: Path  # under systemd: $STATE_DIRECTORY (/var/lib/fleetnest)
    loop_interval_s: float = 1.0  # one pass of the main loop at least this often
    sections: dict[str, dict] = field(default_factory=dict)

    def section(self, name: str) -> dict | None:
        return self.sections.get(name)

    @classmethod
    def from_dict(cls, raw: object, where: str = "edge config") -> EdgeConfig:
        if not isinstance(raw, dict):
            raise EdgeConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in {"device_id", "state_dir", "loop_interval_s", *SECTIONS})
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
        sections = {
            name: _section(f"{where}: {name}", raw[name], spec) for name, spec in SECTIONS.items() if name in raw
        }
        if "inference" not in sections:
            sections["inference"] = _section(f"{where}: inference", {}, SECTIONS["inference"])
        for needs, needed in (("learning", "sensor"), ("fleet", "learning")):
            if needs in sections and needed not in sections:
                raise EdgeConfigError(f"{where}: {needs} needs a {needed} section")
        for name in ("ota", "telemetry"):
            section = sections.get(name)
            if section and (section["cert_file"] is None) != (section["key_file"] is None):
                raise EdgeConfigError(
                    f"{where}: {name}.cert_file and {name}.key_file go together: give both or neither"
                )
        ota = sections.get("ota")
        if ota and ota["ca_file"] and not ota["repository"].startswith("https://"):
            raise EdgeConfigError(f"{where}: ota.ca_file checks an https repository, got {ota['repository']!r}")
        return cls(device, Path(state), float(interval), sections)

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
