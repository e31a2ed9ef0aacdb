"""A simulated fleet for rollouts: N devices (each its own state directory, updater, TUF client and
MQTT connection, as threads of one process) against a real repository, OTA server, rollout
controller and MQTT broker. Used by the canary tests and ``benchmarks/ota.py``."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

from safetensors.numpy import load_file, save_file

from . import keys as fleet_keys
from .agent import DeviceAgent
from .bundle import DeviceProfile
from .client import ReleaseClient
from .layout import RUNTIME_VERSION
from .mqtt import DeviceLink, RolloutBroker
from .release import build_release
from .repository import Repository
from .rings import make_layout
from .rollout import Policy, RolloutController
from .server import RepositoryServer
from .updater import HealthPolicy, Updater

RINGS = (("canary", 0.1), ("ring-25", 0.25), ("ring-50", 0.5), ("ring-100", 1.0))


def build_bundle(archive_root: Path, out: Path, version: int, device_class: str, break_golden: bool = False) -> Path:
    """A bundle of an archived version; ``break_golden`` makes one that fails every health check
    (golden outputs the shipped graph does not give, as a broken build pipeline would produce)."""
    build_release(archive_root, out, device_class, version=version)
    if break_golden:
        golden = load_file(str(out / "golden.safetensors"))
        golden["output.logits"] = golden["output.logits"] + 1.0
        save_file(golden, str(out / "golden.safetensors"))
        manifest = json.loads((out / "manifest.json").read_text())
        data = (out / "golden.safetensors").read_bytes()
        manifest["files"]["golden.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest["release"] += "-broken"
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


class FleetSimulation:
    def __init__(
        self,
        work: Path,
        broker_port: int,
        devices: int = 50,
        rings: tuple[tuple[str, float], ...] = RINGS,
        policy: Policy | None = None,
        poll_s: float = 5.0,
        latency_budget_ms: float = 1000.0,  # simulated devices share the host's cores
    ) -> None:
        self.work = Path(work)
        self.keys = fleet_keys.generate(self.work / "keys")
        self.repository = Repository.create(self.work / "repo", self.keys)
        self.layout = make_layout("fleet-simulation", list(rings))
        self.repository.set_layout(self.layout)
        self.server = RepositoryServer(self.work / "repo").start()
        names = [name for name, _ in rings]
        self.controller = RolloutController(self.work / "rollouts.sqlite", self.repository, names, policy or Policy())
        self.broker = RolloutBroker(
            "127.0.0.1",
            broker_port,
            on_report=self.controller.report,
            current_targeting=lambda: {r: d for r in names if (d := self.repository.desired(r))},
        ).start()
        self.controller.notify = self.broker.publish_desired
        root = (self.repository.metadata_dir / "1.root.json").read_bytes()
        self.agents: list[DeviceAgent] = []
        self.stop = threading.Event()
        for i in range(devices):
            device = f"robot-{i:03d}"
            state = self.work / "devices" / device
            client = ReleaseClient(self.server.url, state, root)
            ring = client.ring(device)
            profile = DeviceProfile("x86-64-cpu", RUNTIME_VERSION)
            updater = Updater(state, client, profile, ring, policy=HealthPolicy(latency_budget_ms=latency_budget_ms))
            link = DeviceLink("127.0.0.1", broker_port, device, ring).start()
            self.agents.append(DeviceAgent(device, ring, updater, link, poll_s=poll_s))
        self.threads = [threading.Thread(target=a.run, args=(self.stop,), daemon=True) for a in self.agents]
        for thread in self.threads:
            thread.start()

    def publish(self, bundle: Path) -> str:
        return self.repository.add_release(bundle)

    def wait(self, states: set[str], timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.controller.status()
            if status["state"] in states:
                return status
            time.sleep(0.1)
        raise TimeoutError(f"rollout still {self.controller.status()['state']} after {timeout} s")

    def running(self) -> dict[str, str | None]:
        return {a.device: (a.updater.state["committed"] or {}).get("release") for a in self.agents}

    def stragglers(self, release: str, timeout: float = 120) -> list[tuple]:
        """Devices not on ``release`` after waiting (promotion needs a healthy share, not every device)."""
        deadline = time.monotonic() + timeout
        while set(self.running().values()) != {release} and time.monotonic() < deadline:
            time.sleep(0.2)
        return [
            (a.device, a.ring, a.outcomes[-1] if a.outcomes else None)
            for a in self.agents
            if self.running()[a.device] != release
        ]

    def installed_ever(self, release: str) -> set[str]:
        return {
            a.device for a in self.agents if any(h["release"] == release for h in a.updater.state.get("history", []))
        }

    def tried(self, release: str) -> set[str]:
        return {a.device for a in self.agents if release in a.updater.state["refused"]}

    def ring_members(self, ring: str) -> set[str]:
        return {a.device for a in self.agents if a.ring == ring}

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        for agent in self.agents:
            agent.link.stop()
        self.broker.stop()
        self.server.stop()
        self.controller.close()
