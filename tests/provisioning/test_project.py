"""A real ``nvflare provision`` of a small fleet through ``fleetnest provision``; rotation of one
site's certificate; device certificates issued and revoked through the command line."""

from __future__ import annotations

import json
import stat

import pytest
import yaml
from cryptography import x509

from provisioning.identities import IdentityError, verify_device_certificate
from simulator.cli import main

from .test_fleet import FLEET

SITES = ["server", "eu-relay", "eu", "eu-depot-1", "eu-depot-2", "admin@fleetnest.dev"]


def _cert(kit, name="client.crt"):
    return x509.load_pem_x509_certificate((kit / "startup" / name).read_bytes())


def _root(kit):
    return x509.load_pem_x509_certificate((kit / "startup" / "rootCA.pem").read_bytes())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    (base / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
    assert main(["provision", "--fleet", str(base / "fleet.yaml"), "--workspace", str(base / "ws")]) == 0
    return base


def test_every_site_gets_a_kit_under_one_root_and_relays_speak_mtls(fleet):
    kits = fleet / "ws" / "fleetnest-test" / "prod_00"
    assert all((kits / site / "startup").is_dir() for site in SITES)
    root = _root(kits / "server")
    for site in ("eu-relay", "eu", "eu-depot-1", "eu-depot-2"):
        _cert(kits / site).verify_directly_issued_by(root)
    relay = json.loads((kits / "eu-depot-1" / "local" / "relay__resources.json").read_text())["relay_config"]
    assert (relay["scheme"], relay["connection_security"], relay["address"]) == ("grpc", "mtls", "localhost:19001")
    client = json.loads((kits / "eu-depot-1" / "startup" / "fed_client.json").read_text())["client"]
    assert (client["fqsn"], client["is_leaf"]) == ("eu.eu-depot-1", True)
    assert json.loads((kits / "scripts" / "lcp_map.json").read_text()) == {
        "eu-depot-1": {"host": "localhost", "port": 19101},
        "eu-depot-2": {"host": "localhost", "port": 19102},
    }
    assert all((kits / leaf / "local" / "device_ca" / "crl.pem").exists() for leaf in ("eu-depot-1", "eu-depot-2"))
    assert stat.S_IMODE((fleet / "ws" / "fleetnest-test" / "state" / "device_ca" / "ca.key").stat().st_mode) == 0o600


def test_rotating_a_leaf_renews_only_its_certificate_under_the_same_root(fleet, capsys):
    args = ["provision", "--fleet", str(fleet / "fleet.yaml"), "--workspace", str(fleet / "ws")]
    before = fleet / "ws" / "fleetnest-test" / "prod_00"
    assert main(args + ["rotate", "--site", "eu-depot-1"]) == 0
    after = sorted((fleet / "ws" / "fleetnest-test").glob("prod_*"))[-1]
    assert after != before
    assert _cert(after / "eu-depot-1").serial_number != _cert(before / "eu-depot-1").serial_number
    assert _cert(after / "eu-depot-2").serial_number == _cert(before / "eu-depot-2").serial_number
    _cert(after / "eu-depot-1").verify_directly_issued_by(_root(before / "server"))
    assert "eu-depot-1: new certificate" in capsys.readouterr().out
    assert main(args + ["rotate", "--site", "nowhere"]) == 1
    assert "'nowhere' is not a site" in capsys.readouterr().err


def test_a_device_certificate_from_the_command_line_is_trusted_by_a_leaf_until_revoked(fleet, capsys):
    args = ["provision", "--fleet", str(fleet / "fleet.yaml"), "--workspace", str(fleet / "ws")]
    out = fleet / "robot-17"
    assert main(args + ["device", "--id", "robot-17", "--out", str(out)]) == 0
    assert stat.S_IMODE((out / "device.key").stat().st_mode) == 0o600
    leaf_ca = sorted((fleet / "ws" / "fleetnest-test").glob("prod_*"))[-1] / "eu-depot-2" / "local" / "device_ca"

    def leaf_verifies():
        ca, crl = (leaf_ca / "ca.pem").read_bytes(), (leaf_ca / "crl.pem").read_bytes()
        return verify_device_certificate((out / "device.crt").read_bytes(), ca, crl)

    assert leaf_verifies() == "robot-17"
    assert main(args + ["revoke", "--device", "robot-17"]) == 0
    with pytest.raises(IdentityError, match="revoked"):
        leaf_verifies()
    assert main(args + ["revoke", "--device", "robot-99"]) == 1
    assert "no certificate issued for 'robot-99'" in capsys.readouterr().err


def test_a_bad_fleet_file_fails_with_the_field_named(tmp_path, capsys):
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(FLEET | {"regions": "eu"}))
    assert main(["provision", "--fleet", str(tmp_path / "fleet.yaml"), "--workspace", str(tmp_path / "ws")]) == 1
    assert "fleet.regions: expected a non-empty list" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_certificates_due_for_renewal_are_renewed_in_one_command(fleet, capsys):
    args = ["provision", "--fleet", str(fleet / "fleet.yaml"), "--workspace", str(fleet / "ws")]
    assert main(args + ["device", "--id", "drone-1", "--out", str(fleet / "drone-1")]) == 0
    assert main(args + ["rotate", "--due-within", "7", "--out", str(fleet / "renewed")]) == 0
    assert "0 device certificates renewed" in capsys.readouterr().out  # valid 14 days: not due yet
    assert main(args + ["rotate", "--due-within", "30", "--out", str(fleet / "renewed")]) == 0
    assert "1 device certificates renewed" in capsys.readouterr().out  # robot-17 is revoked: not renewed
    old = x509.load_pem_x509_certificate((fleet / "drone-1" / "device.crt").read_bytes())
    new = x509.load_pem_x509_certificate((fleet / "renewed" / "drone-1" / "device.crt").read_bytes())
    assert new.serial_number != old.serial_number and new.not_valid_after_utc >= old.not_valid_after_utc


def test_republishing_the_crl_reaches_every_leaf_kit(fleet, capsys):
    args = ["provision", "--fleet", str(fleet / "fleet.yaml"), "--workspace", str(fleet / "ws")]
    kits = sorted((fleet / "ws" / "fleetnest-test").glob("prod_*"))[-1]
    before = (kits / "eu-depot-1" / "local" / "device_ca" / "crl.pem").read_bytes()
    assert main(args + ["crl"]) == 0
    assert "republished" in capsys.readouterr().out
    after = (kits / "eu-depot-1" / "local" / "device_ca" / "crl.pem").read_bytes()
    assert after != before and after == (kits / "eu-depot-2" / "local" / "device_ca" / "crl.pem").read_bytes()


def test_the_routing_proxy_gets_a_tls_certificate_under_the_device_ca(fleet, capsys):
    args = ["provision", "--fleet", str(fleet / "fleet.yaml"), "--workspace", str(fleet / "ws")]
    kits = sorted((fleet / "ws" / "fleetnest-test").glob("prod_*"))[-1]
    device_ca = x509.load_pem_x509_certificate((kits / "scripts" / "proxy_ca.pem").read_bytes())
    first = x509.load_pem_x509_certificate((kits / "scripts" / "proxy.crt").read_bytes())
    first.verify_directly_issued_by(device_ca)
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = first.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert stat.S_IMODE((kits / "scripts" / "proxy.key").stat().st_mode) == 0o600
    assert main(args + ["proxy"]) == 0  # renewal: a new certificate, same CA
    renewed = x509.load_pem_x509_certificate((kits / "scripts" / "proxy.crt").read_bytes())
    assert renewed.serial_number != first.serial_number
    renewed.verify_directly_issued_by(device_ca)
    assert "restart the proxy" in capsys.readouterr().out


def test_a_remote_leaf_serves_devices_under_its_host_name_and_its_internal_listener_stays_local(tmp_path):
    remote = json.loads(json.dumps(FLEET))
    remote["regions"][0]["leaves"][0]["host"] = "depot1.fleet.example"
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(remote))
    assert main(["provision", "--fleet", str(tmp_path / "fleet.yaml"), "--workspace", str(tmp_path / "ws")]) == 0
    kit = tmp_path / "ws" / "fleetnest-test" / "prod_00" / "eu-depot-1"
    internal = json.loads((kit / "local" / "comm_config.json").read_text())["internal"]
    assert internal["resources"]["host"] == "localhost", "the clear internal listener would face the network"
    edge = x509.load_pem_x509_certificate((kit / "startup" / "server.crt").read_bytes())
    names = edge.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "depot1.fleet.example" in names.get_values_for_type(x509.DNSName)
    lcp = json.loads((kit.parent / "scripts" / "lcp_map.json").read_text())
    assert lcp["eu-depot-1"] == {"host": "depot1.fleet.example", "port": 19101}
