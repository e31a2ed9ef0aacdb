"""A fleet of 50 simulated devices (each with its own state directory, updater and MQTT connection)
against a real Mosquitto broker and the OTA server: a release that fails its health check stops at
the canary ring and rolls back there; a good one reaches every device, even across a broker restart."""

import time

import pytest

from app_custom.cluster.archive import ACCEPTED, VersionRecord
from ota.rings import ring_of
from ota.rollout import ABORTED, COMPLETED, Policy
from ota.simulation import RINGS, FleetSimulation, build_bundle

pytestmark = pytest.mark.integration
DEVICES = 50


def test_a_bad_release_stops_at_the_canary_and_a_good_one_reaches_every_device(archive, tmp_path, mosquitto):
    archive, _, trained = archive
    archive.save({k: v * 1.01 for k, v in trained.items()}, VersionRecord(3, ACCEPTED, 1, 2, 8, {}))
    fleet = FleetSimulation(tmp_path / "fleet", mosquitto.port, DEVICES, policy=Policy(min_reports=3))
    try:
        rings = [agent.ring for agent in fleet.agents]
        assert rings == [ring_of(f"robot-{i:03d}", fleet.layout) for i in range(DEVICES)]
        canary = fleet.ring_members("canary")
        assert len(canary) >= 3 and all(rings.count(name) >= 3 for name, _ in RINGS)
        first = fleet.publish(build_bundle(archive.root, tmp_path / "b1", 1, "x86-64-cpu"))
        fleet.controller.start(first)
        assert fleet.wait({COMPLETED})["state"] == COMPLETED
        assert fleet.stragglers(first) == []

        bad = fleet.publish(build_bundle(archive.root, tmp_path / "bad", 3, "x86-64-cpu", break_golden=True))
        fleet.controller.start(bad)
        status = fleet.wait({ABORTED, COMPLETED})
        assert status["state"] == ABORTED and status["stage"] == 0
        time.sleep(6)  # one poll period: late canary devices finish their cycle
        assert fleet.installed_ever(bad) == set()  # no device committed it
        tried = fleet.tried(bad)
        assert tried and tried <= canary  # only canary devices tried it, and each rolled back by itself
        assert set(fleet.running().values()) == {first}

        good = fleet.publish(build_bundle(archive.root, tmp_path / "b3", 3, "x86-64-cpu"))
        fleet.controller.start(good)
        # the broker restarts mid-rollout (its retained messages are lost): the rollout still completes
        deadline = time.monotonic() + 60
        while fleet.controller.status()["stage"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        mosquitto.stop()
        time.sleep(1.0)
        mosquitto.start()
        status = fleet.wait({COMPLETED, ABORTED})
        assert status["state"] == COMPLETED, status
        assert fleet.stragglers(good) == []
    finally:
        fleet.close()
