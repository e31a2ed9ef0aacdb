"""A leaked online key (the OTA server's: rollout, snapshot, timestamp) against the fleet's devices.

The attacker holds everything the serving machine holds and can publish whatever metadata those
keys sign. The ring layout and the releases are signed by the offline targets key, so the attacker
can neither move the fleet into the canary ring nor send a device a release the offline key never
signed: each device computes its ring, and checks its targeting, from offline-signed metadata."""

import json
import shutil

import pytest

from ota import keys as fleet_keys
from ota.client import ReleaseClient, UpdateRefused
from ota.keys import KeyDir, KeyFileError
from ota.repository import ROLLOUT, Repository, RepositoryError
from ota.rings import make_layout, ring_of
from ota.server import RepositoryServer

DEVICES = [f"robot-{i:03d}" for i in range(20)]
LAYOUT = make_layout("fleet-salt", [("canary", 0.1), ("ring-50", 0.5), ("ring-100", 1.0)])


@pytest.fixture
def fleet(bundle, tmp_path):
    """A repository set up at the ceremony (every key on the offline machine), a release published,
    then only the online keys on the serving machine."""
    keys = fleet_keys.generate(tmp_path / "ceremony")
    repository = Repository.create(tmp_path / "repo", keys)
    repository.set_layout(LAYOUT)
    release = repository.add_release(bundle)
    repository.set_desired("canary", {"release": release})
    online = tmp_path / "server-keys"
    (online / "online").mkdir(parents=True)
    shutil.copy(keys.public_file, online / "public.json")
    for role in ("snapshot", "timestamp", "rollout"):
        shutil.copy(keys.private(role), online / "online" / f"{role}.pem")
    server = RepositoryServer(tmp_path / "repo").start()
    root = (repository.metadata_dir / "1.root.json").read_bytes()
    yield Repository(tmp_path / "repo", KeyDir(online)), server.url, root, release, tmp_path
    server.stop()


def _rings(url, root, state):
    rings = {}
    for device in DEVICES:
        rings[device] = ReleaseClient(url, state / device, root).ring(device)
    return rings


def _sign_online(repository: Repository, path: str, document: dict) -> None:
    """What the attacker can publish: any file under the rollout role, then snapshot and timestamp."""
    staging = repository.path / ".staging" / "attack.json"
    staging.parent.mkdir(exist_ok=True)
    staging.write_text(json.dumps(document))
    with repository._locked():
        repository._add_target(repository.rollout, path, staging)
        repository._publish({ROLLOUT: (repository.rollout, repository.keys.signer(ROLLOUT))})


def test_a_leaked_rollout_key_cannot_move_the_fleet_into_the_canary_ring(fleet):
    repository, url, root, _, tmp_path = fleet
    before = _rings(url, root, tmp_path / "devices")
    assert before == {d: ring_of(d, LAYOUT) for d in DEVICES} and set(before.values()) != {"canary"}
    everyone_canary = make_layout("fleet-salt", [("canary", 1.0)])
    with pytest.raises((RepositoryError, KeyFileError)):
        repository.set_layout(everyone_canary)  # the API asks for the offline key
    # signing the layout by hand under the rollout role, wherever a device might look for it
    for path in ("desired/rings.json", "layout/rings.json"):
        _sign_online(repository, path, everyone_canary)
    assert _rings(url, root, tmp_path / "devices") == before  # the same devices, freshly refreshed
    assert _rings(url, root, tmp_path / "new-devices") == before  # and devices that start now


def test_a_leaked_rollout_key_cannot_target_a_release_the_offline_key_never_signed(fleet):
    repository, url, root, release, tmp_path = fleet
    with pytest.raises(RepositoryError, match="not signed into the repository"):
        repository.set_desired("canary", {"release": "v999999-evil"})
    with pytest.raises(KeyFileError):
        repository.keys.signer("targets")  # signing a release needs the offline key, not on this machine
    _sign_online(repository, "releases/v999999-evil/manifest.json", {"release": "v999999-evil"})
    _sign_online(repository, "desired/canary.json", {"release": "v999999-evil"})
    client = ReleaseClient(url, tmp_path / "device", root)
    with pytest.raises(UpdateRefused, match="which no offline key signed"):
        client.desired("canary")
    # what the online key may do: point a ring at a release the offline key signed
    repository.set_desired("canary", {"release": release})
    client.refresh()
    assert client.desired("canary")["release"] == release
