"""A fleet of 50 simulated devices (each with its own state directory, updater and MQTT connection)
against a real Mosquitto broker and the OTA server: a release that fails its health check stops at
the canary ring and rolls back there; a good one reaches every device, even across a broker restart."""

import threading
import time

import pytest

from ota import keys as fleet_keys
from ota.agent import DeviceAgent
from ota.bundle import DeviceProfile
from ota.client import ReleaseClient
from ota.mqtt import DeviceLink, RolloutBroker
from ota.release import RUNTIME_VERSION
from ota.repository import Repository
from ota.rings import make_layout, ring_of
from ota.rollout import ABORTED, COMPLETED, Policy, RolloutController
from ota.server import RepositoryServer
from ota.updater import HealthPolicy, Updater

from .test_updater import publish

pytestmark = pytest.mark.integration
DEVICES = 50
RINGS = [("canary", 0.1), ("ring-25", 0.25), ("ring-50", 0.5), ("ring-100", 1.0)]


class Fleet:
    def __init__(self, archive, tmp_path, broker_port):
        self.archive, self.tmp = archive, tmp_path
        self.keys = fleet_keys.generate(tmp_path / "keys")
        self.repository = Repository.create(tmp_path / "repo", self.keys)
        self.layout = make_layout("canary-test", RINGS)
        self.repository.set_layout(self.layout)
        self.server = RepositoryServer(tmp_path / "repo").start()
        names = [name for name, _ in RINGS]
        self.controller = RolloutController(tmp_path / "rollouts.sqlite", self.repository, names, Policy(min_reports=3))
        self.broker = RolloutBroker(
            "127.0.0.1",
            broker_port,
            on_report=lambda r: self.controller.report(r["device"], r["ring"], r["release"], r["status"], r["reason"]),
            current_targeting=lambda: {
                ring: self.repository.desired(ring) for ring in names if self.repository.desired(ring)
            },
        ).start()
        self.controller.notify = self.broker.publish_desired
        root = (self.repository.metadata_dir / "1.root.json").read_bytes()
        self.agents, self.stop = [], threading.Event()
        for i in range(DEVICES):
            device = f"robot-{i:03d}"
            state = tmp_path / "devices" / device
            client = ReleaseClient(self.server.url, state, root)
            ring = client.ring(device)
            # 50 simulated devices share 2 cores here: latency says nothing about a real device
            policy = HealthPolicy(latency_budget_ms=1000.0)
            updater = Updater(state, client, DeviceProfile("x86-64-cpu", RUNTIME_VERSION), ring, policy=policy)
            link = DeviceLink("127.0.0.1", broker_port, device, ring).start()
            self.agents.append(DeviceAgent(device, ring, updater, link, poll_s=5.0))
        self.threads = [threading.Thread(target=a.run, args=(self.stop,), daemon=True) for a in self.agents]
        for thread in self.threads:
            thread.start()

    def wait(self, states, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.controller.status()
            if status["state"] in states:
                return status
            time.sleep(0.2)
        raise AssertionError(f"rollout still {self.controller.status()} after {timeout} s")

    def all_on(self, release, timeout=120):
        """Promotion needs a healthy share of a ring, not all of it: wait for the stragglers."""
        deadline = time.monotonic() + timeout
        while set(self.running().values()) != {release} and time.monotonic() < deadline:
            time.sleep(0.2)
        return [
            (a.device, a.ring, a.outcomes[-1] if a.outcomes else None, self.threads[i].is_alive())
            for i, a in enumerate(self.agents)
            if self.running()[a.device] != release
        ]

    def running(self):
        return {a.device: (a.updater.state["committed"] or {}).get("release") for a in self.agents}

    def installed_ever(self, release):
        return {
            a.device for a in self.agents if any(h["release"] == release for h in a.updater.state.get("history", []))
        }

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        for agent in self.agents:
            agent.link.stop()
        self.broker.stop()
        self.server.stop()
        self.controller.close()


def test_a_bad_release_stops_at_the_canary_and_a_good_one_reaches_every_device(archive, tmp_path, mosquitto):
    archive_obj = archive[0]
    from app_custom.cluster.archive import ACCEPTED, VersionRecord

    trained = archive[2]
    archive_obj.save({k: v * 1.01 for k, v in trained.items()}, VersionRecord(3, ACCEPTED, 1, 2, 8, {}))
    fleet = Fleet(archive_obj, tmp_path, mosquitto.port)
    try:
        rings = [agent.ring for agent in fleet.agents]
        assert rings == [ring_of(f"robot-{i:03d}", fleet.layout) for i in range(DEVICES)]
        canary = {a.device for a in fleet.agents if a.ring == "canary"}
        assert len(canary) >= 3 and all(rings.count(name) >= 3 for name, _ in RINGS)
        context = (archive_obj, fleet.repository, fleet.server.url, tmp_path)
        first = publish(context, 1)
        fleet.controller.start(first)
        assert fleet.wait({COMPLETED})["state"] == COMPLETED
        assert fleet.all_on(first) == []

        bad = publish(context, 3, break_golden=True)
        fleet.controller.start(bad)
        status = fleet.wait({ABORTED, COMPLETED})
        assert status["state"] == ABORTED and status["targeted"] == [] and status["stage"] == 0
        time.sleep(6)  # a poll period: late canary devices finish their cycle
        assert fleet.installed_ever(bad) == set()  # no device committed it
        outside = [a for a in fleet.agents if a.device not in canary]
        assert all(
            not (a.updater.dir / "slots").exists() or a.updater.state["committed"]["release"] == first for a in outside
        )
        tried = {a.device for a in fleet.agents if bad in a.updater.state["refused"]}
        assert tried and tried <= canary  # only canary devices tried it, and each rolled back by itself
        assert set(fleet.running().values()) == {first}

        good = publish(context, 3)
        fleet.controller.start(good)
        # the broker restarts mid-rollout (retained messages are lost): the rollout still completes
        deadline = time.monotonic() + 60
        while fleet.controller.status()["stage"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        mosquitto.stop()
        time.sleep(1.0)
        mosquitto.start()
        status = fleet.wait({COMPLETED, ABORTED})
        assert status["state"] == COMPLETED, status
        assert fleet.all_on(good) == []
    finally:
        fleet.close()
