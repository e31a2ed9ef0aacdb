"""The systemd unit's confinement directives, and the drop-ins written at install time from the
daemon's configuration: the addresses it may reach (resolved once, at install), the device key as a
credential, and where the daemon then finds its identity."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_runtime.config import EdgeConfig
from edge_runtime.unit import (
    CREDENTIALS_DROP_IN,
    NETWORK_DROP_IN,
    DropInError,
    allowed_addresses,
    identity_dir,
    nameservers,
    resolve,
    write_drop_ins,
)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "edge_runtime" / "systemd" / "fleetnest-edge.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
BASE = {"device_id": "robot-17", "state_dir": "/var/lib/fleetnest"}
FLEET = {
    "sensor": {"fn": "simulator.fleets:make_fleet"},
    "learning": {"job_config": "/etc/fleetnest/device_job.json", "num_classes": 10},
    "fleet": {"proxy": "https://198.51.100.7:4321", "identity": "/etc/fleetnest/identity"},
}


def _service_directives(text: str) -> list[tuple[str, str]]:
    section, found = None, []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            found.append((key, value))
    return found


def test_the_unit_denies_ip_traffic_but_localhost_and_closes_devices_but_the_gpu():
    directives = _service_directives(UNIT.read_text())
    assert ("IPAddressDeny", "any") in directives
    assert [v for k, v in directives if k == "IPAddressAllow"] == ["localhost"]
    assert ("DevicePolicy", "closed") in directives
    allowed = [v for k, v in directives if k == "DeviceAllow"]
    for node in (
        "/dev/nvmap",
        "/dev/nvhost-ctrl-gpu",
        "/dev/nvhost-gpu",
        "/dev/nvgpu/igpu0/ctrl",
        "/dev/nvgpu/igpu0/as",
    ):
        assert f"{node} rw" in allowed
    # debugger and profiler nodes read other contexts' GPU state: never allowed
    assert not [v for v in allowed if re.search(r"dbg|prof|ctxsw", v)]
    assert not [k for k, _ in directives if k in ("PrivateDevices", "LoadCredential")]  # the GPU; see credentials.conf


@needs_systemd
def test_the_unit_scores_no_worse_than_before_its_network_and_device_lists():
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    score = re.search(r"Overall exposure level for fleetnest-edge.service: (\d+\.\d+)", out.stdout)
    assert score and float(score.group(1)) <= 2.0, out.stdout[-300:]


def test_an_address_stands_for_itself_and_a_name_resolves_now():
    assert resolve("fleet.proxy", "192.0.2.1") == ["192.0.2.1"]
    assert resolve("ota.repository", "2001:DB8::1") == ["2001:db8::1"]
    assert "127.0.0.1" in resolve("telemetry.mqtt_host", "localhost")


def test_a_name_that_does_not_resolve_stops_the_install_naming_the_setting():
    config = EdgeConfig.from_dict(BASE | FLEET | {"fleet": FLEET["fleet"] | {"proxy": "https://proxy.invalid:4321"}})
    with pytest.raises(DropInError, match=r"fleet\.proxy: 'proxy\.invalid' does not resolve"):
        allowed_addresses(config, resolv_conf=None)


def test_name_servers_are_allowed_and_loopback_is_left_to_localhost(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\n")
    assert nameservers(resolv) == ["127.0.0.53", "10.0.0.2", "fe80::1"]
    allowed = allowed_addresses(EdgeConfig.from_dict(BASE), resolv_conf=resolv)
    assert allowed == {str(resolv): ["10.0.0.2", "fe80::1"]}
    assert nameservers(tmp_path / "missing") == []
    resolv.write_text("nameserver not-an-address\n")
    with pytest.raises(DropInError, match="resolv.conf:1"):
        nameservers(resolv)


def test_extra_networks_are_checked_and_addresses_are_listed_once():
    config = EdgeConfig.from_dict(BASE | FLEET)
    allowed = allowed_addresses(config, resolv_conf=None, extra=["10.1.2.3/16", "198.51.100.7"])
    assert allowed == {"fleet.proxy": ["198.51.100.7"], "--allow": ["10.1.0.0/16"]}
    with pytest.raises(DropInError, match="--allow"):
        allowed_addresses(config, resolv_conf=None, extra=["everywhere"])


def test_a_fleet_device_gets_its_identity_as_credentials_and_a_device_without_one_loses_a_stale_drop_in(tmp_path):
    out = tmp_path / "fleetnest-edge.service.d"
    written = write_drop_ins(EdgeConfig.from_dict(BASE | FLEET), out, resolv_conf=None)
    assert written == [out / CREDENTIALS_DROP_IN, out / NETWORK_DROP_IN]
    credentials = _service_directives((out / CREDENTIALS_DROP_IN).read_text())
    assert credentials == [
        ("LoadCredential", "device.key:/etc/fleetnest/identity/device.key"),
        ("LoadCredential", "device.crt:/etc/fleetnest/identity/device.crt"),
        ("LoadCredential", "device_ca.pem:/etc/fleetnest/identity/device_ca.pem"),
    ]
    assert _service_directives((out / NETWORK_DROP_IN).read_text()) == [("IPAddressAllow", "198.51.100.7")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}
    assert write_drop_ins(EdgeConfig.from_dict(BASE), out, resolv_conf=None) == [out / NETWORK_DROP_IN]
    assert not (out / CREDENTIALS_DROP_IN).exists()
    assert _service_directives((out / NETWORK_DROP_IN).read_text()) == []  # localhost only: the unit's own


def test_the_command_writes_the_drop_ins_and_exits_2_naming_a_name_that_does_not_resolve(tmp_path):
    config = tmp_path / "edge.yaml"
    config.write_text(
        yaml.safe_dump(
            BASE | FLEET | {"ota": {"repository": "https://203.0.113.9:8765", "root": "/r.json", "device_class": "c"}}
        )
    )
    out = tmp_path / "d"
    command = [
        sys.executable,
        "-m",
        "edge_runtime.unit",
        "--config",
        str(config),
        "--out",
        str(out),
        "--resolv-conf",
        "",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.findall(r"^IPAddressAllow=(.*)$", (out / NETWORK_DROP_IN).read_text(), re.M) == [
        "198.51.100.7",
        "203.0.113.9",
    ]
    config.write_text(yaml.safe_dump(BASE | {"telemetry": {"mqtt_host": "broker.invalid"}}))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "telemetry.mqtt_host: 'broker.invalid' does not resolve" in done.stderr


def test_the_daemon_reads_its_identity_from_the_credentials_systemd_loaded(tmp_path):
    configured = tmp_path / "identity"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "device.key").write_bytes(b"key")
    assert identity_dir(configured, {"CREDENTIALS_DIRECTORY": str(credentials)}) == configured  # no certificate
    (credentials / "device.crt").write_bytes(b"crt")
    assert identity_dir(configured, {"CREDENTIALS_DIRECTORY": str(credentials)}) == configured  # no device CA
    (credentials / "device_ca.pem").write_bytes(b"ca")
    assert identity_dir(configured, {"CREDENTIALS_DIRECTORY": str(credentials)}) == credentials
    assert identity_dir(configured, {}) == configured


def test_install_sh_is_valid_bash_and_writes_the_drop_ins_before_verifying():
    script = ROOT / "edge_runtime" / "systemd" / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    text = script.read_text()
    assert text.index("-m edge_runtime.unit") < text.index("systemd-analyze verify")
