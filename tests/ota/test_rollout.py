"""The rollout controller's states and thresholds, its SQLite persistence across a restart, and
the `fleetnest ota rollout` commands."""

import json

import pytest

from ota.rings import make_layout, ring_of
from ota.rollout import ABORTED, COMPLETED, PAUSED, RUNNING, Policy, RolloutController, RolloutError
from simulator.cli import main

from .test_updater import fleet, publish  # noqa: F401 - the fixture and its helper

RINGS = ["canary", "rest"]
LAYOUT = make_layout("fleet-salt", [("canary", 0.5), ("rest", 1.0)])  # the fleet fixture's signed layout
CANARY = [d for d in (f"robot-{i}" for i in range(50)) if ring_of(d, LAYOUT) == "canary"]
REST = [d for d in (f"robot-{i}" for i in range(50)) if ring_of(d, LAYOUT) == "rest"]


def send(controller, device, ring, release, status="installed", reason=""):
    """A report as the device itself sends it (the transport authenticated it as ``device``)."""
    body = {"device": device, "ring": ring, "release": release, "status": status, "reason": reason}
    return controller.report(device, body)


def _controller(fleet, policy=None, notified=None):  # noqa: F811
    return RolloutController(
        fleet[3] / "rollouts.sqlite",
        fleet[1],
        RINGS,
        policy or Policy(min_reports=2),
        notify=(lambda ring, desired: notified.append((ring, desired))) if notified is not None else None,
    )


def test_rings_are_promoted_on_healthy_reports_and_the_state_survives_a_restart(fleet):  # noqa: F811
    release = publish(fleet, 1)
    notified = []
    controller = _controller(fleet, notified=notified)
    with pytest.raises(RolloutError, match="does not exist"):
        controller.start("v000042-nowhere")
    rollout = controller.start(release)
    assert fleet[1].desired("canary")["release"] == release and fleet[1].desired("rest") is None
    assert notified == [("canary", {"release": release, "rollout": rollout})]
    assert send(controller, CANARY[0], "canary", release) == "counted"
    assert send(controller, CANARY[0], "canary", "v0-other", "rolled-back").startswith("ignored")  # another release
    assert send(controller, REST[0], "rest", release).startswith("refused: ring rest is not targeted")
    assert controller.status()["stage"] == 0
    controller.close()
    restarted = _controller(fleet)  # a server restart: nothing lost
    assert restarted.status()["rings"]["canary"] == {"installed": 1}
    send(restarted, CANARY[1], "canary", release)
    assert restarted.status()["stage"] == 1 and fleet[1].desired("rest")["release"] == release
    with pytest.raises(RolloutError, match="still running"):
        restarted.start(release)
    restarted.pause()
    send(restarted, REST[0], "rest", release)
    send(restarted, REST[1], "rest", release)
    assert restarted.status()["state"] == PAUSED  # no promotion while paused
    restarted.resume()
    assert restarted.status()["state"] == COMPLETED and restarted.fleet_release() == release
    with pytest.raises(RolloutError, match="no running"):
        restarted.pause()


def test_failures_abort_and_point_the_targeted_rings_back(fleet):  # noqa: F811
    first, second = publish(fleet, 1), publish(fleet, 3)
    controller = _controller(fleet)
    controller.start(first)
    for device, ring in [(CANARY[0], "canary"), (CANARY[1], "canary"), (REST[0], "rest"), (REST[1], "rest")]:
        send(controller, device, ring, first)
    assert controller.status()["state"] == COMPLETED
    controller.start(second)
    send(controller, CANARY[0], "canary", second)
    send(controller, CANARY[1], "canary", second, "rolled-back", "health check failed")
    status = controller.status()
    assert status["state"] == ABORTED and "1 of 2 devices failed" in status["reason"]
    assert fleet[1].desired("canary") == {"release": first, "rollback_from": second, "rollout": status["id"]}
    assert fleet[1].desired("rest")["release"] == first  # never targeted with the aborted release
    with pytest.raises(RolloutError, match="not a release the fleet completed"):
        controller.rollback(second)
    controller.rollback(first)
    assert controller.status()["state"] == "rolled-back"


def test_the_rollout_commands(fleet, capsys):  # noqa: F811
    release = publish(fleet, 1)
    _, repository, _, tmp_path = fleet
    common = ["--repo", str(repository.path), "--keys", str(tmp_path / "keys"), "--db", str(tmp_path / "r.sqlite")]
    assert main(["ota", "rollout", "start", *common, "--release", "v9-missing"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["ota", "rollout", "start", *common, "--release", release]) == 0
    assert main(["ota", "rollout", "status", *common]) == 0
    status = json.loads(capsys.readouterr().out.split("started\n", 1)[1])
    assert status["state"] == RUNNING and status["targeted"] == ["canary"]
    assert main(["ota", "rollout", "pause", *common]) == 0 and "paused" in capsys.readouterr().out
    assert main(["ota", "rollout", "resume", *common]) == 0
    assert main(["ota", "rollout", "abort", *common]) == 0 and "aborted" in capsys.readouterr().out
    assert main(["ota", "rollout", "resume", *common]) == 1
    assert (
        main(
            [
                "ota",
                "rings",
                "--repo",
                str(repository.path),
                "--keys",
                str(tmp_path / "keys"),
                "--salt",
                "s",
                "--rings",
                "a:0.5,b:0.4",
            ]
        )
        == 1
    )
    assert "must rise above 0.5" in capsys.readouterr().err
