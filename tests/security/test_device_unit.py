"""Attacks on the edge daemon's confinement, as systemd itself reads the unit.

- A compromised daemon (a malicious sensor plugin, a parser bug in a model or an OTA file) may
  open connections to any address: exfiltration and lateral movement from a robot. The unit must
  deny all IP traffic but localhost, and the install-time drop-in may add only the addresses the
  device's configuration names (its proxy, OTA repository, MQTT broker and name servers).
- It may open any device node its groups reach (``video``: cameras, ``render``: every DRM node):
  the unit must close device access to the standard pseudo devices and the GPU's nodes.
- The device key sits where the service user can read it at any time: with ``LoadCredential=``
  the key stays root-only on disk and the service gets a private copy while it runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_runtime.config import EdgeConfig

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "edge_runtime" / "systemd" / "fleetnest-edge.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")

CONFIG = {
    "device_id": "robot-17",
    "state_dir": "/var/lib/fleetnest",
    "sensor": {"fn": "simulator.fleets:make_fleet"},
    "learning": {"job_config": "/etc/fleetnest/device_job.json", "num_classes": 10},
    "fleet": {"proxy": "https://192.0.2.10:4321", "identity": "/etc/fleetnest/identity"},
    "ota": {"repository": "http://[2001:db8::8]:8765", "root": "/etc/fleetnest/ota-root.json", "device_class": "x"},
    "telemetry": {"mqtt_host": "localhost"},
}


def _security_rows(unit: Path) -> dict[str, str]:
    """``systemd-analyze security --offline`` as {setting: mark and description}."""
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60
    )
    rows = {}
    for line in out.stdout.splitlines():
        match = re.match(r"^\s*([✓✗])\s+(\S+)\s+(.*?)\s*(\d+\.\d+)?$", line)
        if match:
            rows[match.group(2)] = f"{match.group(1)} {match.group(3)}"
    assert rows, out.stdout[-500:] + out.stderr[-500:]
    return rows


def _with_drop_ins(tmp_path: Path, config: dict) -> Path:
    """The unit as systemd loads it on the device: the unit file, then the install-time drop-ins."""
    from edge_runtime.unit import write_drop_ins

    drop_ins = write_drop_ins(EdgeConfig.from_dict(config), tmp_path / "fleetnest-edge.service.d", resolv_conf=None)
    merged = tmp_path / "fleetnest-edge.service"
    merged.write_text(UNIT.read_text() + "".join(path.read_text() for path in drop_ins))
    return merged


def test_the_unit_denies_every_ip_address_but_localhost():
    # without IPAddressDeny=any: "does not define an IP address allow list"
    assert (
        _security_rows(UNIT)["IPAddressDeny="] == "✗ Service defines IP address allow list with only localhost entries"
    )


def test_the_unit_closes_device_access_to_the_gpu_nodes():
    row = _security_rows(UNIT)["DeviceAllow="]
    # without DevicePolicy=closed: "Service has no device ACL", whatever DeviceAllow= says
    assert row.startswith("✗ Service has a device ACL with some special devices: "), row
    allowed = row.split(": ", 1)[1].split()
    assert "/dev/nvmap:rw" in allowed and "/dev/nvgpu/igpu0/ctrl:rw" in allowed
    gpu = re.compile(
        r"^/dev/(nvmap|nvhost-[a-z-]*gpu|nvhost-ctrl|nvgpu/igpu0/[a-z]+|host1x-fence|dri/renderD128|nvidia(ctl|0|-uvm)):rw$"
    )
    # char-rtc:r is ProtectClock='s own read-only entry; nothing else but the GPU
    assert [entry for entry in allowed if not gpu.match(entry)] == ["char-rtc:r"]


def test_with_its_drop_ins_the_unit_allows_only_what_the_configuration_names(tmp_path):
    merged = _with_drop_ins(tmp_path, CONFIG)
    rows = _security_rows(merged)
    assert rows["IPAddressDeny="].startswith("✗ Service defines IP address allow list"), rows["IPAddressDeny="]
    allowed = re.findall(r"^IPAddressAllow=(.*)$", merged.read_text(), re.M)
    # the MQTT broker on localhost adds nothing: loopback is allowed already
    assert " ".join(allowed).split() == ["localhost", "192.0.2.10", "2001:db8::8"]
    out = subprocess.run(["systemd-analyze", "verify", str(merged)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_the_device_key_reaches_the_service_as_a_credential_not_a_readable_file(tmp_path):
    merged = _with_drop_ins(tmp_path, CONFIG).read_text()
    assert re.findall(r"^LoadCredential=(.*)$", merged, re.M) == [
        "device.key:/etc/fleetnest/identity/device.key",
        "device.crt:/etc/fleetnest/identity/device.crt",
        "device_ca.pem:/etc/fleetnest/identity/device_ca.pem",
    ]


def test_the_daemon_runs_on_the_credentials_when_the_key_file_is_not_readable_to_it(tmp_path, monkeypatch):
    from edge_runtime.runtime import _check_files
    from jobs.nested_fleet.job import settings as job_settings

    job = tmp_path / "device_job.json"
    job.write_text(json.dumps(job_settings(argparse.Namespace(devices=8, cohort=3, noise=0.05))))
    credentials = tmp_path / "credentials"  # what systemd sets up from LoadCredential= (the key stays root-only)
    credentials.mkdir()
    for name in ("device.key", "device.crt", "device_ca.pem"):
        (credentials / name).write_bytes(b"-----BEGIN-----\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    unreadable = tmp_path / "identity"  # root:root 0700 on the device: to the service user, not there
    config = CONFIG | {"learning": CONFIG["learning"] | {"job_config": str(job)}}
    config = {k: v for k, v in config.items() if k != "ota"} | {
        "fleet": CONFIG["fleet"] | {"identity": str(unreadable)}
    }
    assert _check_files(EdgeConfig.from_dict(config))["privacy"]
