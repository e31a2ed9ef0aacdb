"""The demo's in-process broker (amqtt, for machines without Mosquitto) enforces the same rules as
the fleet's Mosquitto configuration: TLS client certificates from the device CA (and its CRL) or the
service CA, and each device writes only its own topics."""

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from ota.brokers import EmbeddedBroker, FleetBrokerSetup
from ota.tls import TlsFiles
from provisioning.identities import DeviceCA


@pytest.fixture
def broker(tmp_path):
    ca = DeviceCA.create(tmp_path / "device_ca", "fleet")
    setup = FleetBrokerSetup.create(tmp_path / "mqtt", tmp_path / "device_ca")
    running = EmbeddedBroker(setup).start()
    clients = []

    def identity(device):
        issued = ca.issue(device, 30)
        (tmp_path / f"{device}.pem").write_bytes(issued.cert_pem)
        (tmp_path / f"{device}.key").write_bytes(issued.key_pem)
        return setup.device_tls(tmp_path / f"{device}.pem", tmp_path / f"{device}.key")

    def connect(client_id, tls, port=None, will=None):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if tls is not None:
            client.tls_set_context(tls.client_context())
        if will:
            client.will_set(will, "offline", qos=1)
        outcome, done = [], threading.Event()
        client.on_connect = lambda c, u, f, rc, p: (outcome.append(not rc.is_failure), done.set())
        client.on_disconnect = lambda *args: (outcome.append(False), done.set())
        try:
            client.connect("127.0.0.1", port or setup.config.port)
        except OSError:
            return None
        client.loop_start()
        clients.append(client)
        done.wait(5)
        return client if outcome[:1] == [True] else None

    yield setup, ca, identity, connect
    for client in clients:
        client.loop_stop()
        client.disconnect()
    running.stop()


def test_only_certified_clients_connect_and_a_device_writes_only_its_own_topics(broker):
    setup, ca, identity, connect = broker
    assert connect("intruder", None) is None
    assert connect("intruder", TlsFiles(setup.service_ca.cert_file)) is None  # TLS without a certificate
    assert connect("fleetnest-device-robot-1", identity("robot-1"), port=setup.config.service_port) is None
    assert connect("fleetnest-device-robot-9", identity("robot-2")) is None  # another device's client id
    assert connect("robot-3", identity("robot-3"), will="fleetnest/report/robot-4") is None  # a forged will
    revoked = identity("robot-7")
    assert connect("robot-7", revoked) is not None
    ca.revoke("robot-7")
    assert connect("robot-7", revoked) is None  # the CRL is read again at every connection
    server = connect("fleetnest-rollout-server", setup.rollout, port=setup.config.service_port)
    assert server is not None
    got = []
    server.on_message = lambda c, u, m: got.append(m.topic)
    server.subscribe("fleetnest/report/+", qos=1)
    time.sleep(0.3)
    mallory = connect("fleetnest-device-robot-5", identity("robot-5"), will="fleetnest/presence/robot-5")
    assert mallory is not None
    body = json.dumps({"device": "robot-6", "ring": "canary", "release": "r", "status": "installed"})
    mallory.publish("fleetnest/report/robot-6", body, qos=1).wait_for_publish(5)
    mallory.publish("fleetnest/report/robot-5", body, qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert got == ["fleetnest/report/robot-5"]
