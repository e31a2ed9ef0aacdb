"""The key split: releases and the ring layout are signed on a machine that holds only the offline
keys; the serving machine holds only the online ones and imports what was signed. Neither can do
the other's part, and the server refuses what the offline key did not sign."""

import json
import shutil

import pytest
from tuf.api.metadata import Metadata

from ota.client import ReleaseClient
from ota.keys import KeyDir
from ota.repository import Repository
from ota.rings import make_layout, ring_of
from ota.server import RepositoryServer
from ota.signing import sign_targets
from simulator.cli import main


def _split(ceremony, tmp_path):
    """What leaves the key ceremony: offline/ to the signing machine, online/ to the OTA server."""
    offline, online = tmp_path / "offline-machine", tmp_path / "ota-server"
    (offline / "offline").mkdir(parents=True)
    (online / "online").mkdir(parents=True)
    shutil.copy(ceremony / "offline" / "targets.pem", offline / "offline")
    for role in ("snapshot", "timestamp", "rollout"):
        shutil.copy(ceremony / "online" / f"{role}.pem", online / "online")
    for machine in (offline, online):
        shutil.copy(ceremony / "public.json", machine)
    return offline, online


def _current_targets(repo):
    """The public targets metadata the offline machine signs on top of (copied from the server)."""
    return str(max((repo / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0])))


@pytest.fixture
def split(tmp_path):
    ceremony, repo = tmp_path / "ceremony", tmp_path / "repo"
    assert main(["ota", "keygen", "--keys", str(ceremony)]) == 0
    assert main(["ota", "init", "--repo", str(repo), "--keys", str(ceremony)]) == 0
    offline, online = _split(ceremony, tmp_path)
    shutil.rmtree(ceremony)  # the root keys go to their safes; nothing else keeps a copy
    return repo, offline, online, tmp_path


def test_sign_offline_import_online_and_a_device_installs_nothing_else(split, bundle, capsys):
    repo, offline, online, tmp_path = split
    sign = ["ota", "sign", "--keys", str(offline)]
    # the serving machine cannot sign a release or a layout: it lacks the offline key
    assert main(["ota", "publish", "--repo", str(repo), "--keys", str(online), "--bundle", str(bundle)]) == 1
    assert "offline/targets.pem" in capsys.readouterr().err
    assert main(["ota", "rings", "--repo", str(repo), "--keys", str(online), "--salt", "s"]) == 1
    # the offline machine signs the layout and a release, on top of the public targets metadata
    assert main([*sign, "--targets", _current_targets(repo), "--salt", "s", "--out", str(tmp_path / "s1")]) == 0
    assert main(["ota", "import", "--repo", str(repo), "--keys", str(online), "--signed", str(tmp_path / "s1")]) == 0
    assert (
        main([*sign, "--targets", _current_targets(repo), "--bundle", str(bundle), "--out", str(tmp_path / "s2")]) == 0
    )
    assert main(["ota", "import", "--repo", str(repo), "--keys", str(online), "--signed", str(tmp_path / "s2")]) == 0
    repository = Repository(repo, KeyDir(online))
    release = repository.releases()[0]
    repository.set_desired("canary", {"release": release})  # the online rollout key targets it
    with RepositoryServer(repo) as server:
        client = ReleaseClient(server.url, tmp_path / "device", (repo / "metadata" / "1.root.json").read_bytes())
        assert client.ring("robot-1") == ring_of("robot-1", make_layout("s"))
        assert client.desired("canary")["release"] == release
        assert client.release_file(release, "manifest.json").length > 0
    assert repository.layout() == make_layout("s")


def test_the_server_imports_only_what_the_offline_key_signed(split, bundle, tmp_path, capsys):
    repo, offline, online, _ = split
    current = _current_targets(repo)
    # an attacker on the server signs "offline" metadata with the online rollout key
    forged = tmp_path / "forged-keys"
    (forged / "offline").mkdir(parents=True)
    shutil.copy(online / "online" / "rollout.pem", forged / "offline" / "targets.pem")
    public = json.loads((online / "public.json").read_text())
    public["targets"] = public["rollout"]
    (forged / "public.json").write_text(json.dumps(public))
    forged_sign = ["ota", "sign", "--keys", str(forged), "--targets", current, "--salt", "x"]
    assert main([*forged_sign, "--out", str(tmp_path / "f")]) == 1
    assert "not signed by this fleet's targets key" in capsys.readouterr().err
    base = Metadata.from_file(current)
    base.signatures.clear()
    base.sign(KeyDir(forged).signer("targets"))  # re-signed so the signing step accepts it as a base
    base.to_file(str(tmp_path / "base.json"))
    sign_targets(KeyDir(forged), tmp_path / "base.json", tmp_path / "f2", layout=make_layout("x", [("canary", 1.0)]))
    imp = ["ota", "import", "--repo", str(repo), "--keys", str(online), "--signed"]
    assert main([*imp, str(tmp_path / "f2")]) == 1
    assert "not signed by the fleet's targets key" in capsys.readouterr().err
    # genuine, but a file swapped in transit
    genuine = ["ota", "sign", "--keys", str(offline), "--targets", current, "--bundle", str(bundle)]
    assert main([*genuine, "--out", str(tmp_path / "g")]) == 0
    victim = next(p for p in (tmp_path / "g" / "targets").rglob("*") if p.is_file() and "model.onnx" in p.name)
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert main([*imp, str(tmp_path / "g")]) == 1
    assert "does not match" in capsys.readouterr().err
    victim.write_bytes(original)
    assert main([*imp, str(tmp_path / "g")]) == 0
    # replayed: the same signed folder again (an older version by now) is refused
    assert main([*imp, str(tmp_path / "g")]) == 1
    assert "is not the next one" in capsys.readouterr().err
    assert Repository(repo).layout() is None and len(Repository(repo).releases()) == 1
