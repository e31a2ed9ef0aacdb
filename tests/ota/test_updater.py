"""The device updater end to end: a real repository served over HTTP, `fleetnest ota update` cycles,
refusals, the mission lock, a health-check rollback, and a kill at every phase."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from app_custom.cluster.archive import ACCEPTED, VersionRecord
from ota import keys as fleet_keys
from ota.bundle import read_manifest, verify_files
from ota.repository import Repository
from ota.rings import make_layout
from ota.server import RepositoryServer
from ota.simulation import build_bundle
from simulator.cli import main


@pytest.fixture
def fleet(archive, tmp_path):
    """An archive with versions 1 and 3, a repository with the ring layout, served over HTTP."""
    archive, _, trained = archive
    archive.save({k: v * 1.01 for k, v in trained.items()}, VersionRecord(3, ACCEPTED, 1, 2, 8, {"val_acc": 0.92}))
    keys = fleet_keys.generate(tmp_path / "keys")
    repository = Repository.create(tmp_path / "repo", keys)
    repository.set_layout(make_layout("fleet-salt", [("canary", 0.5), ("rest", 1.0)]))
    server = RepositoryServer(tmp_path / "repo").start()
    yield archive, repository, server.url, tmp_path
    server.stop()


def publish(fleet, version, device_class="x86-64-cpu", break_golden=False):
    archive, repository, _, tmp_path = fleet
    out = tmp_path / f"bundle-{version}-{device_class}-{break_golden}"
    return repository.add_release(build_bundle(archive.root, out, version, device_class, break_golden))


def target(fleet, release, rings=("canary", "rest")):
    for ring in rings:
        fleet[1].set_desired(ring, {"release": release})


def running_first_with_newer_targeted(fleet, **newer):
    """robot-1 installed release 1; release 3 is then published and targeted: (first, newer, state)."""
    first = publish(fleet, 1)
    target(fleet, first)
    _, state = update(fleet)
    second = publish(fleet, 3, **newer)
    target(fleet, second)
    return first, second, state


def update(fleet, device="robot-1", *extra, env=None):
    _, repository, url, tmp_path = fleet
    state = tmp_path / "devices" / device
    args = ["ota", "update", "--repo", url, "--state", str(state), "--device-id", device]
    args += ["--device-class", "x86-64-cpu", "--trusted-root", str(repository.metadata_dir / "1.root.json"), *extra]
    if env is None:
        return main(args), state
    command = [sys.executable, "-m", "simulator.cli", *args]
    return subprocess.run(command, env=os.environ | env, capture_output=True, text=True), state


def active(state):
    """The release the device runs, after checking that ``current`` is a complete verified bundle."""
    if not (state / "current").exists():
        return None
    manifest = read_manifest(state / "current")
    verify_files(state / "current", manifest)
    assert (state / "current" / "model.personal.onnx").stat().st_size > 0
    return manifest["release"]


def test_install_stay_up_to_date_move_forward_and_refuse_to_go_back(fleet, capsys):
    first = publish(fleet, 1)
    target(fleet, first)
    code, state = update(fleet)
    assert code == 0 and active(state) == first and "installed" in capsys.readouterr().out
    assert update(fleet)[0] == 0 and "already running" in capsys.readouterr().out
    second = publish(fleet, 3)
    target(fleet, second)
    assert update(fleet)[0] == 0 and active(state) == second
    assert os.readlink(state / "current") == "slots/b"
    target(fleet, first)  # the rollout server asks for an older release: the version floor refuses
    assert update(fleet)[0] == 1
    assert "not newer than the committed version 3 (rollback refused)" in capsys.readouterr().err
    assert active(state) == second


def test_a_release_for_another_device_class_is_refused(fleet, capsys):
    other = publish(fleet, 1, device_class="jetson-orin-jp6")
    target(fleet, other)
    code, state = update(fleet)
    assert code == 1 and "is for jetson-orin-jp6, this device is x86-64-cpu" in capsys.readouterr().err
    assert active(state) is None


def test_the_mission_lock_stages_the_release_and_the_switch_waits(fleet):
    first = publish(fleet, 1)
    target(fleet, first)
    state = fleet[3] / "devices" / "robot-1"
    state.mkdir(parents=True)
    (state / "mission.lock").touch()
    code, _ = update(fleet)
    assert code == 75 and active(state) is None
    (state / "mission.lock").unlink()
    assert update(fleet)[0] == 0 and active(state) == first


def test_a_release_that_fails_its_health_check_is_rolled_back_and_not_retried(fleet, capsys):
    good, bad, state = running_first_with_newer_targeted(fleet, break_golden=True)
    code, _ = update(fleet)
    err = capsys.readouterr().err
    assert code == 1 and "rolled-back" in err and "golden outputs differ" in err
    assert active(state) == good
    assert update(fleet)[0] == 1 and "refused before" in capsys.readouterr().err


@pytest.mark.parametrize("phase", ["downloading", "verifying", "staging", "switching", "health-checking"])
def test_a_kill_at_any_phase_leaves_a_complete_verified_model_and_the_next_cycle_finishes(fleet, phase):
    first, second, state = running_first_with_newer_targeted(fleet)
    killed, _ = update(fleet, "robot-1", env={"FLEETNEST_OTA_CRASH_AT": phase})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert active(state) in (first, second)  # a complete, verified bundle either way
    assert not (state / "slots/.a.tmp").exists() or active(state) == first
    code, _ = update(fleet)
    assert code == 0 and active(state) == second
    assert json.loads((state / "state.json").read_text())["floor"] == 3


def test_devices_place_themselves_in_rings_from_the_signed_layout(fleet):
    from ota.client import ReleaseClient
    from ota.rings import ring_of

    _, repository, url, tmp_path = fleet
    client = ReleaseClient(url, tmp_path / "ringcheck", (repository.metadata_dir / "1.root.json").read_bytes())
    layout = make_layout("fleet-salt", [("canary", 0.5), ("rest", 1.0)])
    rings = [client.ring(f"robot-{i}") for i in range(40)]
    assert rings == [ring_of(f"robot-{i}", layout) for i in range(40)]
    assert 8 <= rings.count("canary") <= 32 and set(rings) == {"canary", "rest"}
    assert np.mean([ring_of(f"d{i}", make_layout("s")) == "canary" for i in range(4000)]) == pytest.approx(
        0.05, abs=0.02
    )


def test_a_model_slower_than_the_latency_budget_is_rolled_back(fleet, capsys):
    good, newer, state = running_first_with_newer_targeted(fleet)
    code, _ = update(fleet, "robot-1", "--latency-budget-ms", "0.001")
    assert code == 1 and "latency p99" in capsys.readouterr().err
    assert active(state) == good


def test_a_signed_rollback_moves_a_device_back_only_to_a_release_it_ran(fleet, capsys):
    first, second, state = running_first_with_newer_targeted(fleet)
    update(fleet)
    _, newcomer = update(fleet, "robot-3")  # joined the fleet on the newer release
    for ring in ("canary", "rest"):
        fleet[1].set_desired(ring, {"release": first, "rollback_from": second})
    assert update(fleet)[0] == 0 and active(state) == first
    capsys.readouterr()
    assert update(fleet, "robot-3")[0] == 1 and active(newcomer) == second
    assert "rollback refused" in capsys.readouterr().err


def test_a_tampered_artifact_leaves_the_device_on_its_model_with_the_reason(fleet, capsys):
    good, newer, state = running_first_with_newer_targeted(fleet)
    repository = fleet[1]
    stored = (
        repository.targets_dir
        / repository.targets.signed.targets[f"releases/{newer}/model.onnx"].get_prefixed_paths()[0]
    )
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    capsys.readouterr()
    assert update(fleet)[0] == 1
    assert "does not match its signed sha256" in capsys.readouterr().err
    assert active(state) == good and not list((state / "downloads").rglob("*.part"))


@pytest.mark.parametrize("attack", ["freeze", "mix-and-match", "unsigned-release", "endless-data"])
def test_metadata_attacks_leave_the_device_on_its_model_with_the_reason(fleet, capsys, attack):
    import shutil
    from datetime import datetime, timedelta, timezone

    from tuf.api.metadata import Metadata

    from ota.repository import ROLLOUT

    _, repository, _, tmp_path = fleet
    good, newer, state = running_first_with_newer_targeted(fleet)
    meta = repository.metadata_dir
    keys = fleet_keys.KeyDir(tmp_path / "keys")
    if attack == "freeze":
        frozen = Metadata.from_bytes((meta / "timestamp.json").read_bytes())
        frozen.signed.version += 1
        frozen.signed.expires = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
        frozen.sign(keys.signer("timestamp"))
        (meta / "timestamp.json").write_bytes(frozen.to_bytes())
        expected = "expired"
    elif attack == "mix-and-match":
        current = repository.snapshot.signed.meta[f"{ROLLOUT}.json"].version
        shutil.copyfile(meta / f"{current - 1}.{ROLLOUT}.json", meta / f"{current}.{ROLLOUT}.json")
        expected = "Expected rollout v"
    elif attack == "unsigned-release":
        evil = repository.path / ".staging/evil.json"
        evil.parent.mkdir(exist_ok=True)
        evil.write_text('{"release": "v999999-x86-64-cpu"}')
        with repository._locked():
            for ring in ("canary", "rest"):
                repository._add_target(repository.rollout, f"desired/{ring}.json", evil)
            repository._publish({ROLLOUT: (repository.rollout, keys.signer(ROLLOUT))})
        expected = "which no offline key signed"
    else:  # the server sends more than the signed length of a release file
        stored = (
            repository.targets_dir
            / repository.targets.signed.targets[f"releases/{newer}/model.onnx"].get_prefixed_paths()[0]
        )
        stored.write_bytes(stored.read_bytes() + b"\0" * 100_000)
        expected = "endless data"
    capsys.readouterr()
    assert update(fleet)[0] == 1
    assert expected in capsys.readouterr().err
    assert active(state) == good
