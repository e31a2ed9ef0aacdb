"""A rollout end to end as the demo runs it: keys split at a ceremony, the release signed offline
and imported online, HTTPS downloads checked against the service CA, reports over TLS with device
certificates through the in-process broker, counted because each device sends its own, in its
signed ring."""

import time

from ota.agent import DeviceAgent
from ota.brokers import EmbeddedBroker, FleetBrokerSetup
from ota.bundle import DeviceProfile
from ota.client import ReleaseClient
from ota.layout import RUNTIME_VERSION
from ota.mqtt import DeviceLink
from ota.rings import make_layout, ring_of
from ota.rollout import COMPLETED, Policy
from ota.service import FleetOtaService
from ota.tls import TlsFiles
from ota.updater import HealthPolicy, Updater
from provisioning.identities import DeviceCA

RINGS = (("canary", 0.5), ("rest", 1.0))
SALT = "tls-rollout"


def test_a_release_signed_offline_rolls_out_over_https_and_authenticated_mqtt(archive, tmp_path):
    archive, _, _ = archive
    layout = make_layout(SALT, list(RINGS))
    names = [f"robot-{i}" for i in range(20)]
    devices = [next(d for d in names if ring_of(d, layout) == ring) for ring, _ in RINGS]
    ca = DeviceCA.create(tmp_path / "device_ca", "fleet")
    setup = FleetBrokerSetup.create(tmp_path / "mqtt", tmp_path / "device_ca")
    broker = EmbeddedBroker(setup).start()
    ota = FleetOtaService(tmp_path / "ota", RINGS, SALT, setup.service_ca, broker=setup, policy=Policy(min_reports=1))
    assert not (tmp_path / "ota" / "online" / "offline").exists()  # the server holds no offline key
    agents = []
    try:
        assert ota.url.startswith("https://") and ota.broker.connected.wait(10)
        for device in devices:
            issued = ca.issue(device, 30)
            (tmp_path / f"{device}.crt").write_bytes(issued.cert_pem)
            (tmp_path / f"{device}.key").write_bytes(issued.key_pem)
            state = tmp_path / "devices" / device
            client = ReleaseClient(ota.url, state, ota.root.read_bytes(), tls=TlsFiles(setup.service_ca.cert_file))
            ring = client.ring(device)
            updater = Updater(
                state, client, DeviceProfile("x86-64-cpu", RUNTIME_VERSION), ring, policy=HealthPolicy(1000.0)
            )
            link = DeviceLink(
                "127.0.0.1",
                setup.config.port,
                device,
                ring,
                tls=setup.device_tls(tmp_path / f"{device}.crt", tmp_path / f"{device}.key"),
            ).start()
            assert link.connected.wait(10)
            agents.append(DeviceAgent(device, ring, updater, link))
        release = ota.publish(archive.root, 1, "x86-64-cpu")
        ota.controller.start(release)
        deadline = time.monotonic() + 60
        while ota.controller.status()["state"] != COMPLETED and time.monotonic() < deadline:
            for agent in agents:
                agent.cycle()
            time.sleep(0.3)
        status = ota.controller.status()
        assert status["state"] == COMPLETED, status
        assert status["rings"] == {"canary": {"installed": 1}, "rest": {"installed": 1}}
        assert ota.controller.refused == 0
        assert all(agent.updater.state["committed"]["release"] == release for agent in agents)
    finally:
        for agent in agents:
            agent.link.stop()
        ota.close()
        broker.stop()
