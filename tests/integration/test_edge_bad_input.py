"""Bad input to a running daemon: a configuration naming a file that is not there, no model to
serve and an OTA repository that is down, an MQTT broker that is down, a full disk. Each gets a
clear message, the daemon keeps inferring with what it has, and nothing is lost: health records
wait (bounded) for the broker, checkpoints resume once there is room and the last one stays
whole."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from edge_runtime.checkpoints import CheckpointStore
from simulator.edge_fleet import ROOT, DaemonProcess, device_job, edge_config, set_probe
from tests.ota_fixtures import Mosquitto

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    found = re.search(rf"^fleetnest_{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def wait_metric(port: int, name: str, predicate, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = metric(port, name)
        if value is not None and predicate(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"{name} = {value} after {timeout} s")


def _config(tmp_path: Path, **sections) -> tuple[Path, int]:
    job = device_job(tmp_path / "job.json")
    probe = tmp_path / "probe.json"
    set_probe(probe, idle=True, charging=True)
    path = edge_config(tmp_path, "robot-7", 1, job, probe, min_interval_s=0.5)
    raw = yaml.safe_load(path.read_text())
    port = free_port()
    raw["telemetry"] = {"metrics_port": port, "interval_s": 0.5} | sections.pop("telemetry", {})
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw))
    return path, port


def test_a_config_naming_a_missing_file_is_refused_with_the_setting_and_the_path(tmp_path):
    path, _ = _config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["learning"]["job_config"] = str(tmp_path / "nowhere.json")
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "simulator.cli", "edge", "run", "--config", str(path)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "learning.job_config: cannot read" in out.stderr and "nowhere.json" in out.stderr


def test_no_model_a_dead_repository_and_a_dead_broker_and_it_still_infers_then_catches_up(tmp_path):
    broker = Mosquitto(tmp_path)  # a free port, nothing listening yet
    root = tmp_path / "root.json"
    root.write_text("{}")
    dead = free_port()
    ota = {"repository": f"http://127.0.0.1:{dead}", "root": str(root), "device_class": "x86-64-cpu", "poll_s": 1}
    telemetry = {"mqtt_host": "127.0.0.1", "mqtt_port": broker.port, "buffer": 20}
    path, port = _config(tmp_path, ota=ota, telemetry=telemetry)
    daemon = DaemonProcess(path).start()
    try:
        assert daemon.wait_for("recovered", 90), daemon.text()[-2000:]
        assert daemon.wait_for("serving local model (torch; no release installed yet)", 60), daemon.text()[-2000:]
        first = wait_metric(port, "inferences", lambda v: v > 0)
        time.sleep(3)
        assert metric(port, "inferences") > first + 20  # 20 Hz sensors, served by the local model
        text = daemon.text()
        assert "repository unreachable" in text or "unavailable" in text, text[-2000:]
        queued = wait_metric(port, "telemetry_queued", lambda v: v >= 5)
        assert queued <= 20  # bounded: the oldest are dropped and counted
        got: list[tuple[str, bytes]] = []
        broker.start()
        listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-listener")
        listener.on_message = lambda c, u, m: got.append((m.topic, m.payload))
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("fleetnest/#", qos=1)
        listener.loop_start()
        wait_metric(port, "telemetry_queued", lambda v: v <= 1, timeout=60)
        deadline = time.monotonic() + 10
        while sum(t == "fleetnest/health/robot-7" for t, _ in got) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = [json.loads(p) for t, p in got if t == "fleetnest/health/robot-7"]
        assert len(health) >= 5 and all(h["device"] == "robot-7" for h in health)
        assert [h["at"] for h in health] == sorted(h["at"] for h in health)  # in order
        assert ("fleetnest/presence/robot-7", b"online") in got
        daemon.kill()  # the last will says so
        deadline = time.monotonic() + 30
        while ("fleetnest/presence/robot-7", b"offline") not in got and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ("fleetnest/presence/robot-7", b"offline") in got
        listener.loop_stop()
    finally:
        daemon.stop()
        broker.stop()


def test_with_the_fleets_tls_settings_it_reports_through_the_authenticated_broker_and_nothing_else(tmp_path):
    from ota.brokers import FleetBrokerSetup, MosquittoBroker
    from provisioning.identities import DeviceCA

    ca = DeviceCA.create(tmp_path / "device_ca", "fleet")
    issued = ca.issue("robot-7", 30)
    (tmp_path / "device.crt").write_bytes(issued.cert_pem)
    (tmp_path / "device.key").write_bytes(issued.key_pem)
    setup = FleetBrokerSetup.create(tmp_path / "mqtt", tmp_path / "device_ca")
    broker = MosquittoBroker(setup).start()
    got: list[tuple[str, bytes]] = []
    monitor = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-monitor")
    monitor.tls_set_context(setup.monitor.client_context())
    monitor.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    monitor.on_connect = lambda c, *_: c.subscribe([("fleetnest/health/+", 1), ("fleetnest/presence/+", 1)])
    monitor.connect("127.0.0.1", setup.config.service_port)
    monitor.loop_start()
    telemetry = {
        "mqtt_host": "127.0.0.1",
        "mqtt_port": setup.config.port,
        "ca_file": str(setup.service_ca.cert_file),
        "cert_file": str(tmp_path / "device.crt"),
        "key_file": str(tmp_path / "device.key"),
    }
    path, _ = _config(tmp_path, telemetry=telemetry)
    daemon = DaemonProcess(path).start()
    try:
        deadline = time.monotonic() + 90
        while sum(t == "fleetnest/health/robot-7" for t, _ in got) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = [json.loads(p) for t, p in got if t == "fleetnest/health/robot-7"]
        assert len(health) >= 2 and all(h["device"] == "robot-7" for h in health), daemon.text()[-2000:]
        assert ("fleetnest/presence/robot-7", b"online") in got
        assert {t.rsplit("/", 1)[-1] for t, _ in got} == {"robot-7"}
    finally:
        daemon.stop()
        monitor.loop_stop()
        broker.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_keeps_it_inferring_and_checkpoints_resume_once_there_is_room(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        path, port = _config(tmp_path)
        raw = yaml.safe_load(path.read_text())
        raw["state_dir"] = str(disk / "state")
        path.write_text(yaml.safe_dump(raw))
        daemon = DaemonProcess(path).start()
        try:
            assert daemon.wait_for("checkpoint 2", 90), daemon.text()[-2000:]
            filler = disk / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            store = CheckpointStore(disk / "state" / "checkpoints")
            before = wait_metric(port, "inferences", lambda v: v > 0)
            assert daemon.wait_for("No space left on device", 60), daemon.text()[-2000:]
            time.sleep(3)
            assert metric(port, "inferences") > before + 20  # inferring all along
            full = store.latest()
            assert full is not None  # the last checkpoint is whole
            filler.unlink()
            deadline = time.monotonic() + 60
            while (latest := store.latest()).seq <= full.seq and time.monotonic() < deadline:
                time.sleep(0.2)
            assert latest.seq > full.seq, "no checkpoint after space came back"
        finally:
            assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
