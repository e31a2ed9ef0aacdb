"""The fleet's TUF repository against python-tuf's client over real HTTP: releases signed offline,
targeting signed online, and the attacks TUF exists for, each refused with a reason."""

import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile

from ota import keys as fleet_keys
from ota.client import ReleaseClient, UpdateRefused
from ota.repository import ROLLOUT, Repository, RepositoryError


@pytest.fixture
def repo(bundle, http_root, tmp_path):
    folder, url = http_root
    keys = fleet_keys.generate(tmp_path / "keys")
    repository = Repository.create(folder / "repo", keys)
    release = repository.add_release(bundle)
    repository.set_desired("canary", {"release": release})
    trusted_root = (folder / "repo/metadata/1.root.json").read_bytes()
    return repository, keys, release, f"{url}/repo", trusted_root


def _client(repo, tmp_path, name="device"):
    repository, _, _, url, trusted_root = repo
    return ReleaseClient(url, tmp_path / name, trusted_root)


def _file(repository, path):
    info = repository.targets.signed.targets.get(path) or repository.rollout.signed.targets[path]
    return repository.targets_dir / info.get_prefixed_paths()[0]


def test_a_device_reads_its_ring_targeting_and_downloads_the_signed_release(repo, tmp_path):
    repository, keys, release, _, _ = repo
    client = _client(repo, tmp_path)
    assert client.desired("canary") == {"release": release}
    assert client.desired("wide") is None  # nothing targeted at that ring
    manifest = json.loads(client.fetch(client.release_file(release, "manifest.json")))
    assert manifest["release"] == release
    path = client.download(client.release_file(release, "model.onnx"), tmp_path / "model.onnx")
    assert path.stat().st_size == manifest["files"]["model.onnx"]["bytes"]
    # the private keys are files only their owner can read
    assert (keys.path / "offline/targets.pem").stat().st_mode & 0o077 == 0
    with pytest.raises(fleet_keys.KeyFileError, match="never overwritten"):
        fleet_keys.generate(keys.path)


def test_a_tampered_or_oversized_artifact_is_refused(repo, tmp_path):
    repository, _, release, _, _ = repo
    stored = _file(repository, f"releases/{release}/model.onnx")
    good = stored.read_bytes()
    stored.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    client = _client(repo, tmp_path)
    with pytest.raises(UpdateRefused, match="does not match its signed length or hash"):
        client.download(client.release_file(release, "model.onnx"), tmp_path / "m.onnx")
    stored.write_bytes(good + b"\0" * 1_000_000)  # endless data: more than the signed length
    with pytest.raises(UpdateRefused, match="longer than its signed length|signed length or hash"):
        client.download(client.release_file(release, "model.onnx"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_frozen_rolled_back_or_mixed_metadata_is_refused(repo, tmp_path):
    repository, keys, release, _, _ = repo
    meta = repository.metadata_dir
    _client(repo, tmp_path).desired("canary")  # the device has seen the current metadata
    # rollback: an older timestamp, validly signed, replayed by a mirror
    old_timestamp = (meta / "timestamp.json").read_bytes()
    repository.refresh_timestamp()
    _client(repo, tmp_path).refresh()
    (meta / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(UpdateRefused, match="rollback"):
        _client(repo, tmp_path).refresh()
    # freeze: a validly signed timestamp that has expired
    repository.refresh_timestamp()
    frozen = Metadata.from_bytes((meta / "timestamp.json").read_bytes())
    frozen.signed.version += 1
    frozen.signed.expires = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    frozen.sign(keys.signer("timestamp"))
    (meta / "timestamp.json").write_bytes(frozen.to_bytes())
    with pytest.raises(UpdateRefused, match="expired"):
        _client(repo, tmp_path, "fresh-device").refresh()
    # mix-and-match: the current snapshot's targets file swapped for another (validly signed) version
    repository.refresh_timestamp()
    current = repository.snapshot.signed.meta["targets.json"].version
    shutil.copyfile(meta / f"{current - 1}.targets.json", meta / f"{current}.targets.json")
    with pytest.raises(UpdateRefused, match="Expected targets v"):
        _client(repo, tmp_path, "third-device").desired("canary")


def test_targeting_signed_by_the_online_key_alone_cannot_name_an_unsigned_release(repo, tmp_path):
    repository, keys, release, _, _ = repo
    with pytest.raises(RepositoryError, match="not signed into the repository"):
        repository.set_desired("canary", {"release": "v999999-evil"})
    # a compromised rollout server signs targeting for a release no offline key signed ...
    evil = repository.path / ".staging/evil.json"
    evil.parent.mkdir(exist_ok=True)
    evil.write_text(json.dumps({"release": "v999999-evil"}))
    with repository._locked():
        repository._add_target(repository.rollout, "desired/canary.json", evil)
        # ... and even lists the release's files under its own (online) role
        repository._add_target(repository.rollout, "releases/v999999-evil/manifest.json", evil)
        repository._publish({ROLLOUT: (repository.rollout, keys.signer(ROLLOUT))})
    client = _client(repo, tmp_path)
    with pytest.raises(UpdateRefused, match="names release 'v999999-evil', which no offline key signed"):
        client.desired("canary")


def test_a_foreign_key_or_an_unsigned_release_file_is_refused(repo, tmp_path):
    repository, _, release, _, _ = repo
    meta = repository.metadata_dir
    forged = Metadata.from_bytes((meta / "timestamp.json").read_bytes())
    forged.signed.version += 1
    forged.sign(CryptoSigner.generate_ed25519())
    (meta / "timestamp.json").write_bytes(forged.to_bytes())
    with pytest.raises(UpdateRefused, match="not signed by the trusted keys"):
        _client(repo, tmp_path).refresh()
    repository.refresh_timestamp()
    with pytest.raises(UpdateRefused, match="has no signed file"):
        _client(repo, tmp_path, "other").release_file(release, "extra.bin")
    assert isinstance(_client(repo, tmp_path, "x").release_file(release, "golden.safetensors"), TargetFile)


def test_root_keys_rotate_and_a_device_that_trusts_the_first_root_follows(repo, tmp_path):
    repository, keys, release, _, _ = repo
    old = keys.root_signers()
    new = [CryptoSigner.generate_ed25519() for _ in range(3)]
    with pytest.raises(RepositoryError, match="cannot meet a threshold"):
        repository.rotate_root(old, new[:1], threshold=2)
    repository.rotate_root(old[:2], new[:2])
    newer = [CryptoSigner.generate_ed25519() for _ in range(3)]
    repository.rotate_root(new[:2], newer[:2])
    client = _client(repo, tmp_path)  # bootstrapped with root version 1
    assert client.desired("canary") == {"release": release}
    assert json.loads((tmp_path / "device/tuf/root.json").read_text())["signed"]["version"] == 3
    # a rotation signed by the new keys only (the old threshold missing) is refused at the source
    with pytest.raises(RepositoryError, match="threshold of both"):
        repository.rotate_root([], [CryptoSigner.generate_ed25519() for _ in range(3)])


def test_keygen_init_publish_and_serve_from_the_command_line(bundle, tmp_path, capsys):
    import subprocess
    import sys

    import urllib3

    from simulator.cli import main

    keys, repo = str(tmp_path / "k"), str(tmp_path / "r")
    assert main(["ota", "keygen", "--keys", keys]) == 0
    assert main(["ota", "keygen", "--keys", keys]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert main(["ota", "publish", "--repo", repo, "--keys", keys, "--bundle", str(bundle)]) == 1
    assert "not a fleetnest OTA repository" in capsys.readouterr().err
    assert main(["ota", "init", "--repo", repo, "--keys", keys]) == 0
    assert main(["ota", "publish", "--repo", repo, "--keys", keys, "--bundle", str(bundle)]) == 0
    assert "published v000001-x86-64-cpu" in capsys.readouterr().out
    assert main(["ota", "publish", "--repo", repo, "--keys", keys, "--bundle", str(bundle)]) == 1
    assert "never replaced" in capsys.readouterr().err
    before = json.loads((tmp_path / "r/metadata/timestamp.json").read_text())["signed"]["version"]
    command = [sys.executable, "-m", "simulator.cli", "ota", "serve", "--repo", repo, "--keys", keys, "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(" at ")[1].strip()
        timestamp = json.loads(urllib3.PoolManager().request("GET", f"{url}/metadata/timestamp.json").data)
        assert timestamp["signed"]["version"] == before + 1  # renewed on start with the online key
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp", "rollout"])
def test_a_role_key_rotates_devices_follow_and_the_old_key_no_longer_counts(repo, tmp_path, role):
    repository, keys, release, _, _ = repo
    device = _client(repo, tmp_path)
    assert device.desired("canary") == {"release": release}  # trusts the first root and keys
    old = keys.signer(role)
    fleet_keys.replace_key(keys, role)
    with pytest.raises(fleet_keys.KeyFileError, match="root keys rotate with rotate_root"):
        fleet_keys.replace_key(keys, "root-1")
    repository.rotate_key(role, keys.root_signers()[:2])
    assert _client(repo, tmp_path).desired("canary") == {"release": release}  # the same device, next check
    # metadata of that role signed with the retired key is refused from now on
    meta = repository.metadata_dir
    name = "timestamp.json" if role == "timestamp" else None
    if name is None:
        version = (
            repository.snapshot.signed.version
            if role == "snapshot"
            else repository.snapshot.signed.meta[f"{role}.json"].version
        )
        name = f"{version}.{role}.json"
    forged = Metadata.from_bytes((meta / name).read_bytes())
    forged.sign(old)
    (meta / name).write_bytes(forged.to_bytes())
    with pytest.raises(UpdateRefused, match="not signed by the trusted keys|signed by 0/1"):
        _client(repo, tmp_path, "new-device").desired("canary")  # fetches every file afresh


def test_the_rotate_command(repo, capsys):
    from simulator.cli import main

    repository, keys, release, _, _ = repo
    args = ["ota", "rotate", "--repo", str(repository.path), "--keys", str(keys.path)]
    assert main([*args, "--role", "snapshot"]) == 0 and "snapshot key rotated" in capsys.readouterr().out
    assert (keys.path / "online/snapshot.pem.retired-1").exists()
    assert Repository(repository.path).root.signed.version == 2


def test_two_writers_never_publish_a_stale_view(repo, tmp_path):
    """The server renewing the timestamp and an operator's rollout command are separate processes
    with their own Repository objects: each change starts from what is on disk."""
    repository, keys, release, _, _ = repo
    server_side = Repository(repository.path, keys)
    operator_side = Repository(repository.path, keys)
    _client(repo, tmp_path).desired("canary")
    operator_side.set_desired("wide", {"release": release})
    server_side.refresh_timestamp()  # its in-memory snapshot predates the operator's change
    client = _client(repo, tmp_path)
    assert client.desired("wide") == {"release": release} and client.desired("canary") == {"release": release}
