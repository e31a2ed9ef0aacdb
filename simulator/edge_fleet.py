"""Edge daemons as processes on one machine, with the OTA service they update from: what the
full-loop demo, the edge tests and ``benchmarks/edge.py`` start.

- ``device_job(path)``: the device side of ``jobs/nested_fleet`` (config, data, privacy), as
  ``job.py --print-device-config`` prints it;
- ``seed_archive(root, job)``: a cluster archive for the devices' model, with an accepted trained
  version, for runs without a FLARE deployment (tests, benchmarks);
- ``OtaService``: TUF keys, repository, signed ring layout, HTTP server and, with a broker, the
  rollout controller that takes reports over MQTT;
- ``edge_config(...)``: one daemon's ``edge.yaml``; ``DaemonProcess``: ``fleetnest edge run`` as a
  child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from app_custom.durable import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CLASS = "x86-64-cpu"
SENSOR = "simulator.fleets:sensor_stream"
FLEET = {"dataset": "digits", "regime": "label_skew", "num_devices": 8}
NUM_CLASSES = 10
INPUT_SPEC = {"vision": [1, 8, 8]}


def device_job(path: Path, *flags: str) -> Path:
    """Write the device side of the nested_fleet job (what every daemon's learner runs); ``flags``
    are ``job.py``'s, as the job is submitted with them (``--noise`` must match)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "nested_fleet" / "job.py"), "--print-device-config", *flags],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    path.write_text(out.stdout)
    return path


def seed_archive(
    root: Path, job: dict, versions: int = 1, input_spec: dict | None = None, num_classes: int = NUM_CLASSES
) -> Path:
    """An archive with the model card, the initial version and ``versions`` accepted trained ones."""
    input_spec = input_spec or INPUT_SPEC
    import torch

    from app_custom.cluster.archive import ACCEPTED, VersionArchive, VersionRecord
    from app_custom.nested.config import NestedConfig
    from app_custom.nested.levels import partition_parameters
    from app_custom.nested.models import build_model

    config = NestedConfig.from_dict(job["config"])
    torch.manual_seed(config.seed)
    model = build_model(config.model, {k: tuple(v) for k, v in input_spec.items()}, num_classes)
    shared = partition_parameters(model, config.levels).shared_names
    archive = VersionArchive(root)
    card = {"config": job["config"], "input_spec": input_spec, "num_classes": num_classes, "shared_names": shared}
    archive.write_model_card(card)
    params = {name: p.detach().numpy().copy() for name, p in model.named_parameters() if name in shared}
    archive.save(params, VersionRecord(0, ACCEPTED, None, None, 0, {}, "initial weights"))
    rng = np.random.default_rng(0)
    for version in range(1, versions + 1):
        params = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        archive.save(params, VersionRecord(version, ACCEPTED, version - 1, version - 1, 3, {"val_acc": 0.5}))
    return root


class OtaService:
    """A signed repository served on localhost, with one machine holding every key: for tests and
    benchmarks of devices' updates. The demo's service (``ota.service.FleetOtaService``) splits the
    keys, serves HTTPS and runs the authenticated rollout controller."""

    def __init__(self, work: Path, rings: tuple[tuple[str, float], ...], salt: str = "fleetnest-demo"):
        from ota import keys as fleet_keys
        from ota.repository import Repository
        from ota.rings import make_layout
        from ota.server import RepositoryServer

        self.work = Path(work)
        self.keys = fleet_keys.generate(self.work / "keys")
        self.repository = Repository.create(self.work / "repo", self.keys)
        self.layout = make_layout(salt, list(rings))
        self.repository.set_layout(self.layout)
        self.server = RepositoryServer(self.work / "repo").start()
        self.root = self.work / "root.json"
        self.root.write_bytes((self.repository.metadata_dir / "1.root.json").read_bytes())

    @property
    def url(self) -> str:
        return self.server.url

    def ring_of(self, device: str) -> str:
        from ota.rings import ring_of

        return ring_of(device, self.layout)

    def publish(self, archive_root: Path, version: int, **build) -> str:
        from ota.release import build_release

        bundle = self.work / "bundles" / f"v{version}"
        if not bundle.exists():
            build_release(archive_root, bundle, DEVICE_CLASS, version=version, **build)
        return self.repository.add_release(bundle)

    def target(self, ring: str, release: str) -> None:
        """Target one ring directly (no rollout controller): tests and benchmarks."""
        self.repository.set_desired(ring, {"release": release})

    def close(self) -> None:
        self.server.stop()


def edge_config(
    work: Path,
    device: str,
    index: int,
    job: Path,
    probe: Path,
    ota: OtaService | None = None,
    mqtt_port: int | None = None,
    fleet: dict | None = None,
    rate_hz: float = 20.0,
    sensor: dict | None = None,
    **learning,
) -> Path:
    """Write ``work/<device>/edge.yaml``: sensors of fleet device ``index``, learning gated by the
    file probe ``probe``, OTA from ``ota``, telemetry to the broker on ``mqtt_port``."""
    folder = Path(work) / device
    folder.mkdir(parents=True, exist_ok=True)
    config: dict = {
        "device_id": device,
        "state_dir": str(folder / "state"),
        "loop_interval_s": 0.5,
        "sensor": sensor or {"fn": SENSOR, "kwargs": {"index": index, **FLEET}, "rate_hz": rate_hz},
        "learning": {
            "job_config": str(job),
            "num_classes": NUM_CLASSES,
            "capacity": 200,
            "min_samples": 40,
            "steps": 20,
            "min_interval_s": 1.0,
            "budget_s": 60.0,
            "probe": {"kind": "file", "path": str(probe)},
        }
        | learning,
    }
    if ota is not None:
        config["ota"] = {"repository": ota.url, "root": str(ota.root), "device_class": DEVICE_CLASS, "poll_s": 1.0}
    if mqtt_port is not None:
        config["telemetry"] = {"mqtt_host": "127.0.0.1", "mqtt_port": mqtt_port, "interval_s": 1.0}
    if fleet is not None:
        config["fleet"] = fleet
    path = folder / "edge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def set_probe(path: Path, idle: bool, charging: bool) -> None:
    write_json_atomic(path, {"idle": idle, "charging": charging})


class DaemonProcess:
    """``fleetnest edge run --config`` as a child process (what systemd runs on a Jetson)."""

    def __init__(self, config: Path, env: dict | None = None, device_python: str | Path | None = None) -> None:
        """``device_python``: the Python of a device install (``pip install '.[device]'``), whose
        ``fleetnest`` runs the daemon from what that install holds; default: this checkout."""
        self.config = Path(config)
        self.log = self.config.parent / "daemon.log"
        self.env = env or {}
        # absolute, not resolved: a venv's python is a link to the base interpreter
        self.device_python = None if device_python is None else Path(device_python).absolute()
        self.process: subprocess.Popen | None = None
        self.offset = 0

    def start(self) -> DaemonProcess:
        arguments = ["edge", "run", "--config", str(self.config)]
        if self.device_python is None:
            command, cwd = [sys.executable, "-m", "simulator.cli", *arguments], ROOT
            env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | self.env
        else:  # nothing of this checkout on the path: only the device install
            command, cwd = [str(self.device_python.with_name("fleetnest")), *arguments], self.config.parent
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"} | self.env
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def text(self) -> str:
        """What this run of the daemon logged (the log file holds every run's)."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.process is not None and self.process.poll() is not None:
                return needle in self.text()
            time.sleep(0.1)
        return False
