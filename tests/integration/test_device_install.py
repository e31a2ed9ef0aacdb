"""A device's install is only the device: in an empty virtual environment, torch first (as JetPack
provides it on a Jetson), then ``pip install '.[device]'``. FLARE, the plotting and the data-set
packages are not there, and ``fleetnest edge run`` from that install infers on recorded sensor
samples, learns, and installs a signed release. (The full loop of ``make demo`` runs all its daemons
from such an install too, with their leaves and the rollout.)"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from app_custom.nested.device_data import save_labelled
from simulator.edge_fleet import FLEET, DaemonProcess, OtaService, device_job, edge_config, seed_archive, set_probe
from simulator.fleets import make_fleet

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NOT_ON_A_DEVICE = ("nvflare", "matplotlib", "sklearn", "pyts", "amqtt")


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # no .pyc at install: the daemon compiles what it imports
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-compile"]
    torch = version("torch").split("+")[0]  # this machine's wheel (the CPU one); a Jetson has JetPack's
    subprocess.run([*pip, f"torch=={torch}"], check=True, capture_output=True, timeout=900)
    installed = subprocess.run([*pip, f"{ROOT}[device]"], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


def test_the_device_install_holds_no_flare_and_no_simulation_packages(device_python, tmp_path):
    for module in NOT_ON_A_DEVICE:
        found = subprocess.run([str(device_python), "-c", f"import {module}"], capture_output=True, text=True)
        assert found.returncode != 0 and "No module named" in found.stderr, module
    fleetnest = str(device_python.with_name("fleetnest"))
    shown = subprocess.run([fleetnest, "--version"], capture_output=True, text=True)
    assert shown.stdout.strip() == f"fleetnest {version('fleetnest')}", shown.stderr
    # a cluster verb says which extra it needs instead of a traceback
    simulate = subprocess.run([fleetnest, "simulate", "--out", "unused"], capture_output=True, text=True, cwd=tmp_path)
    assert simulate.returncode == 2 and "pip install 'fleetnest[cluster]'" in simulate.stderr, simulate.stderr[-2000:]


def test_its_daemon_infers_learns_and_installs_a_signed_release(device_python, tmp_path):
    job_path = device_job(tmp_path / "job.json")
    archive = seed_archive(tmp_path / "archive", json.loads(job_path.read_text()))
    ota = OtaService(tmp_path / "ota", (("all", 1.0),))
    daemon = None
    try:
        release = ota.publish(archive, 1)
        ota.target("all", release)
        train = make_fleet(**FLEET).devices[1].train
        recorded = tmp_path / "recorded.npz"
        save_labelled(recorded, {"vision": train.x}, train.y)
        probe = tmp_path / "probe.json"
        set_probe(probe, idle=True, charging=True)
        sensor = {"fn": "edge_runtime.sensors:replay", "kwargs": {"path": str(recorded)}, "rate_hz": 50.0}
        config = edge_config(tmp_path, "robot-1", 1, job_path, probe, ota=ota, min_interval_s=0.0, sensor=sensor)
        daemon = DaemonProcess(config, device_python=device_python).start()
        assert daemon.wait_for(f"serving {release}", 120), daemon.text()[-3000:]
        assert daemon.wait_for("micro-update 1:", 120), daemon.text()[-3000:]
        assert "Traceback" not in daemon.text(), daemon.text()[-3000:]
    finally:
        if daemon is not None:
            daemon.stop()
        ota.close()
