"""The edge daemon as systemd sees it: the unit verifies without a word and scores as hardened;
the daemon says READY only once its state is recovered, pets the watchdog at the configured rate
from its main loop, stops petting when that loop hangs, and refuses a bad configuration with a
message naming the field."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from edge_runtime.config import EdgeConfig, EdgeConfigError
from edge_runtime.daemon import RUN_RECORD, EdgeDaemon
from edge_runtime.notify import SystemdNotifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "edge_runtime" / "systemd" / "fleetnest-edge.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@needs_systemd
def test_the_unit_verifies_without_any_output():
    out = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@needs_systemd
def test_the_unit_scores_as_hardened_offline():
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    score = re.search(r"Overall exposure level for fleetnest-edge.service: (\d+\.\d+)", out.stdout)
    assert score, out.stdout[-500:]
    assert float(score.group(1)) <= 3.0  # "OK" in systemd's words; an unhardened unit scores 9.2


class Listener:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                raw = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def collect_until(self, key: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.times(key):
            self.collect(0.2)

    def times(self, key: str) -> list[float]:
        return [at for at, fields in self.messages if key in fields]


def _config(tmp_path: Path, **change) -> Path:
    path = tmp_path / "edge.yaml"
    raw = {"device_id": "robot-17", "state_dir": str(tmp_path / "state"), "loop_interval_s": 0.05} | change
    path.write_text(yaml.safe_dump(raw))
    return path


def test_ready_after_recovery_then_watchdog_at_the_configured_rate_then_stopping(tmp_path):
    listener = Listener(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "simulator.cli", "edge", "run", "--config", str(_config(tmp_path))]
    daemon = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        listener.collect_until("READY", 60)  # imports take a few seconds
        listener.collect(5)  # about 10 pings at 0.5 s
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        listener.collect(0.5)
    finally:
        daemon.kill()
    first = listener.messages[0][1]
    assert first.get("READY") == "1" and "recovered" in first.get("STATUS", "")
    assert json.loads((tmp_path / "state" / RUN_RECORD).read_text())["starts"] == 1
    pings = listener.times("WATCHDOG")
    assert len(pings) >= 8, f"{len(pings)} watchdog pings"
    gap = statistics.median(b - a for a, b in zip(pings, pings[1:], strict=False))
    assert 0.35 <= gap <= 0.75, f"median gap {gap:.3f} s for a 0.5 s interval (WatchdogSec 1 s)"
    assert listener.messages[-1][1].get("STOPPING") == "1"


def test_no_watchdog_once_the_main_loop_hangs(tmp_path):
    listener = Listener(tmp_path / "notify.sock")
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "200000"})
    config = EdgeConfig.from_dict({"device_id": "robot-17", "state_dir": str(tmp_path / "state")})
    passes, release, hung_at = [0], threading.Event(), []

    def step():  # a training or inference step that, at its 10th pass, never returns
        passes[0] += 1
        if passes[0] == 10:
            hung_at.append(time.monotonic())
            release.wait()

    stop = threading.Event()
    runner = threading.Thread(target=EdgeDaemon(config, [step], notifier).run, args=(stop,))
    runner.start()
    try:
        listener.collect(3.0)
    finally:
        stop.set()
        release.set()
        runner.join(timeout=10)
    assert hung_at, "the step never hung"
    before = [t for t in listener.times("WATCHDOG") if t < hung_at[0]]
    after = [t for t in listener.times("WATCHDOG") if t > hung_at[0] + 0.05]
    assert len(before) >= 3 and after == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("device_id: robot-17\n", "state_dir is required"),
        ("device_id: robot 17\nstate_dir: /tmp/x\n", "device_id 'robot 17'"),
        ("device_id: r\nstate_dir: relative/path\n", "state_dir must be an absolute path"),
        ("device_id: r\nstate_dir: /tmp/x\nloop_interval_s: 0\n", "loop_interval_s must be in"),
        ("device_id: r\nstate_dir: /tmp/x\nmqtt_brokr: x\n", "unknown settings \\['mqtt_brokr'\\]"),
        ("device_id: r\nstate_dir: /tmp/x\nloop_interval_s: .nan\n", "loop_interval_s must be a number"),
        ("device_id: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
        (
            "device_id: r\nstate_dir: /tmp/x\ntelemetry: {mqtt_host: h, cert_file: /etc/fleetnest/device.crt}\n",
            "telemetry.cert_file and telemetry.key_file go together",
        ),
        (
            "device_id: r\nstate_dir: /tmp/x\n"
            "ota: {repository: 'http://ota:8765', root: /r.json, device_class: c, ca_file: /etc/ca.pem}\n",
            "ota.ca_file checks an https repository",
        ),
        ("device_id: r\nstate_dir: /tmp/x\ntelemetry: {ca_file: relative.pem}\n", "ca_file must be an absolute path"),
    ],
)
def test_a_bad_config_is_refused_with_a_message_naming_the_field(tmp_path, text, reason):
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    with pytest.raises(EdgeConfigError, match=reason):
        EdgeConfig.load(path)


def test_the_command_exits_2_with_the_reason_on_a_bad_config(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("device_id: robot-17\n")
    out = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "edge", "run", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "state_dir is required" in out.stderr, out.stderr[-500:]


def test_the_example_configuration_loads_and_so_does_every_section_in_it():
    example = ROOT / "edge_runtime" / "systemd" / "edge.yaml.example"
    assert EdgeConfig.load(example).device_id == "robot-17"
    lines = example.read_text().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if not line.startswith("#")) :]  # past the header
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in body)
    raw = yaml.safe_load(uncommented)
    config = EdgeConfig.from_dict(raw)
    assert set(config.sections) == {"inference", "sensor", "learning", "fleet", "ota", "telemetry"}
    assert config.section("learning")["probe"] == {"kind": "jetson"}
