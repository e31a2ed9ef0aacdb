"""Forged rollout reports against a real Mosquitto set up by ``ota.broker_config`` (TLS, device
certificates, topic ACLs) and the rollout controller's report gate.

The reviewer's attack on the unauthenticated setup: 12 "installed" reports from devices that do
not exist took a rollout through all four rings, and one forged failure aborted a rollout and had
the server sign a fleet rollback."""

import json
import ssl
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from app_custom.cluster.archive import ACCEPTED, VersionRecord
from ota import keys as fleet_keys
from ota.brokers import FleetBrokerSetup, MosquittoBroker
from ota.mqtt import RolloutBroker
from ota.repository import Repository
from ota.rings import make_layout, ring_of
from ota.rollout import ABORTED, COMPLETED, RUNNING, Policy, RolloutController
from ota.simulation import build_bundle
from ota.tls import TlsFiles
from provisioning.identities import DeviceCA

RINGS = [("canary", 0.1), ("ring-25", 0.25), ("ring-50", 0.5), ("ring-100", 1.0)]
LAYOUT = make_layout("fleet-salt", RINGS)
DEVICES = [f"robot-{i:03d}" for i in range(60)]


def members(ring):
    return [d for d in DEVICES if ring_of(d, LAYOUT) == ring]


class Fleet:
    """Device CA, broker, repository with two releases, rollout controller taking MQTT reports."""

    def __init__(self, tmp_path, archive):
        archive, _, trained = archive
        archive.save({k: v * 1.01 for k, v in trained.items()}, VersionRecord(3, ACCEPTED, 1, 2, 8, {}))
        self.tmp = tmp_path
        self.device_ca = DeviceCA.create(tmp_path / "device_ca", "fleet")
        self.setup = FleetBrokerSetup.create(tmp_path / "mqtt", tmp_path / "device_ca")
        self.broker = MosquittoBroker(self.setup).start()
        try:
            keys = fleet_keys.generate(tmp_path / "keys")
            self.repository = Repository.create(tmp_path / "repo", keys)
            self.repository.set_layout(LAYOUT)
            self.first = self.repository.add_release(build_bundle(archive.root, tmp_path / "b1", 1, "x86-64-cpu"))
            self.second = self.repository.add_release(build_bundle(archive.root, tmp_path / "b3", 3, "x86-64-cpu"))
            enrolled = {d for d in DEVICES}
            self.controller = RolloutController(
                tmp_path / "rollouts.sqlite",
                self.repository,
                policy=Policy(min_reports=3),
                enrolled=enrolled.__contains__,
            )
            self.received: list[tuple] = []
            self.handled = threading.Condition()

            def on_report(sender, body):
                verdict = self.controller.report(sender, body)
                with self.handled:
                    self.received.append((sender, body, verdict))
                    self.handled.notify_all()

            self.rollout = RolloutBroker(
                "127.0.0.1",
                self.setup.config.service_port,
                on_report=on_report,
                current_targeting=lambda: {},
                tls=self.setup.rollout,
            ).start()
            self.controller.notify = self.rollout.publish_desired
            assert self.rollout.connected.wait(10)
        except BaseException:
            self.broker.stop()  # a failed setup leaves no broker behind
            raise
        self.clients: list[mqtt.Client] = []

    def identity(self, device):
        folder = self.tmp / "identities"
        folder.mkdir(exist_ok=True)
        issued = self.device_ca.issue(device, 30)
        (folder / f"{device}.pem").write_bytes(issued.cert_pem)
        (folder / f"{device}.key").write_bytes(issued.key_pem)
        return self.setup.device_tls(folder / f"{device}.pem", folder / f"{device}.key")

    def connect(self, device=None, tls=None, port=None):
        """A connected client, or None when the broker refuses it."""
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device or "intruder")
        if tls is not None:
            client.tls_set_context(tls.client_context())
        outcome: list[bool] = []
        done = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: (outcome.append(not rc.is_failure), done.set())
        client.on_disconnect = lambda *args: (outcome.append(False), done.set())
        try:
            client.connect("127.0.0.1", port or self.setup.config.port, keepalive=10)
        except (OSError, ssl.SSLError):
            return None
        client.loop_start()
        self.clients.append(client)
        done.wait(5)
        return client if outcome[:1] == [True] else None

    def device(self, name):
        client = self.connect(name, self.identity(name))
        assert client is not None, f"{name} could not connect"
        return client

    def send(self, client, topic_device, body, wait=True):
        """Publish a report; wait until the rollout server handled every message sent so far."""
        before = len(self.received)
        client.publish(f"fleetnest/report/{topic_device}", json.dumps(body), qos=1).wait_for_publish(5)
        if wait:
            with self.handled:
                self.handled.wait_for(lambda: len(self.received) > before, timeout=5)
        return self.received[before:]

    def close(self):
        for client in self.clients:
            client.loop_stop()
            client.disconnect()
        self.rollout.stop()
        self.controller.close()
        self.broker.stop()


@pytest.fixture
def fleet(tmp_path, archive):
    fleet = Fleet(tmp_path, archive)
    yield fleet
    fleet.close()


def report(device, ring, release, status="installed"):
    return {"device": device, "ring": ring, "release": release, "status": status, "reason": ""}


def test_a_client_without_a_device_certificate_cannot_connect(fleet):
    assert fleet.connect() is None  # plain TCP
    assert fleet.connect(tls=TlsFiles(fleet.setup.service_ca.cert_file)) is None  # TLS, but no certificate
    foreign = DeviceCA.create(fleet.tmp / "other_ca", "another fleet").issue("robot-000", 30)
    (fleet.tmp / "f.pem").write_bytes(foreign.cert_pem)
    (fleet.tmp / "f.key").write_bytes(foreign.key_pem)
    assert fleet.connect("robot-000", fleet.setup.device_tls(fleet.tmp / "f.pem", fleet.tmp / "f.key")) is None
    # a device certificate is no service identity: the service listener refuses it
    assert fleet.connect("robot-001", fleet.identity("robot-001"), port=fleet.setup.config.service_port) is None
    assert fleet.connect("robot-002", fleet.identity("robot-002")) is not None


def test_a_revoked_device_is_refused_once_the_broker_reloads_its_crl(fleet):
    tls = fleet.identity("robot-003")
    assert fleet.connect("robot-003", tls) is not None
    fleet.device_ca.revoke("robot-003")
    fleet.broker.stop()
    fleet.broker.start()
    assert fleet.connect("robot-003", tls) is None
    assert fleet.connect("robot-004", fleet.identity("robot-004")) is not None


def test_a_device_cannot_publish_another_devices_report_topic(fleet):
    fleet.controller.start(fleet.first)
    mallory = members("ring-100")[0]
    victim = members("canary")[0]
    client = fleet.device(mallory)
    assert fleet.send(client, victim, report(victim, "canary", fleet.first), wait=False) == []
    time.sleep(0.5)
    assert fleet.received == []  # the broker dropped it: the rollout server never saw it
    own = fleet.send(client, mallory, report(mallory, "ring-100", fleet.first))
    assert [(sender, verdict) for sender, _, verdict in own] == [
        (mallory, "refused: ring ring-100 is not targeted yet")
    ]


def test_a_forged_body_naming_another_device_or_ring_is_refused(fleet):
    fleet.controller.start(fleet.first)
    mallory = members("ring-100")[0]
    client = fleet.device(mallory)
    ((_, _, other_device),) = fleet.send(client, mallory, report(members("canary")[0], "canary", fleet.first))
    assert other_device.startswith("refused") and "naming device" in other_device
    ((_, _, other_ring),) = fleet.send(client, mallory, report(mallory, "canary", fleet.first))
    assert other_ring.startswith("refused") and "places it in 'ring-100'" in other_ring
    status = fleet.controller.status()
    assert status["rings"]["canary"] == {} and fleet.controller.refused == 2


def test_twelve_forged_installed_reports_do_not_promote(fleet):
    fleet.controller.start(fleet.first)
    canary = members("canary")
    assert len(canary) >= 3
    # devices that do not exist cannot even connect; one real device sends twelve, as twelve devices
    insider = fleet.device(canary[0])
    ghosts = [f"ghost-{i}" for i in range(12)]
    for i, ghost in enumerate(ghosts):
        fleet.send(insider, canary[0], report(ghost, RINGS[i // 3][0], fleet.first))
    # or as itself, twelve times: it counts once (and the rest of the burst is rate-limited)
    verdicts = [
        v for _ in range(12) for _, _, v in fleet.send(insider, canary[0], report(canary[0], "canary", fleet.first))
    ]
    assert verdicts.count("counted") <= 10 and "counted" in verdicts
    status = fleet.controller.status()
    assert status["state"] == RUNNING and status["stage"] == 0 and status["rings"]["canary"] == {"installed": 1}
    # the real canary devices, each reporting once, promote it
    for device in canary[1:3]:
        fleet.send(fleet.device(device), device, report(device, "canary", fleet.first))
    assert fleet.controller.status()["stage"] == 1


def test_one_forged_failure_does_not_abort(fleet):
    fleet.controller.start(fleet.first)
    for ring, _ in RINGS:
        for device in members(ring)[:3]:
            fleet.send(fleet.device(device), device, report(device, ring, fleet.first))
    assert fleet.controller.status()["state"] == COMPLETED
    fleet.controller.start(fleet.second)
    outsider = members("ring-50")[0]
    client = fleet.device(outsider)
    canary = members("canary")[0]
    fleet.send(client, canary, report(canary, "canary", fleet.second, "rolled-back"), wait=False)  # dropped
    fleet.send(client, outsider, report(canary, "canary", fleet.second, "rolled-back"))  # another device
    fleet.send(client, outsider, report(outsider, "canary", fleet.second, "rolled-back"))  # another ring
    fleet.send(client, outsider, report(outsider, "ring-50", fleet.second, "rolled-back"))  # not targeted
    time.sleep(0.3)
    status = fleet.controller.status()
    assert status["state"] == RUNNING and status["rings"]["canary"] == {}
    assert fleet.repository.desired("canary") == {"release": fleet.second, "rollout": status["id"]}  # no rollback
    # a genuine canary failure still aborts (the policy: one failure in the canary ring)
    fleet.send(fleet.device(canary), canary, report(canary, "canary", fleet.second, "rolled-back"))
    assert fleet.controller.status()["state"] == ABORTED
