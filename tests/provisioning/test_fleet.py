"""The fleet description: what it becomes, and what it refuses."""

from __future__ import annotations

import copy

import pytest

from provisioning.fleet import FleetSpecError, fleet_spec_from_dict
from provisioning.project import project_config

FLEET = {
    "project": "fleetnest-test",
    "server": {"host": "localhost", "fed_learn_port": 18002},
    "admins": [{"name": "admin@fleetnest.dev", "role": "project_admin"}],
    "devices": {"valid_days": 14},
    "regions": [
        {
            "name": "eu",
            "relay": {"port": 19001},
            "leaves": [
                {"name": "eu-depot-1", "edge_port": 19101, "expected_devices": 400},
                {"name": "eu-depot-2", "edge_port": 19102, "expected_devices": 600},
            ],
        }
    ],
}


def test_each_region_becomes_a_relay_with_mtls_a_regional_client_and_leaves_under_it():
    spec = fleet_spec_from_dict(FLEET)
    assert spec.expected_devices == 1000 and spec.device_valid_days == 14
    participants = {p["name"]: p for p in project_config(spec)["participants"]}
    relay = participants["eu-relay"]
    assert relay["type"] == "relay"
    assert relay["listening_host"] == {
        "default_host": "localhost",
        "port": 19001,
        "scheme": "grpc",
        "connection_security": "mtls",
    }
    assert participants["eu"] == {
        "name": "eu",
        "type": "client",
        "org": "fleetnest",
        "connect_to": {"name": "eu-relay"},
    }
    leaf = participants["eu-depot-2"]
    assert (leaf["parent"], leaf["connect_to"], leaf["edge_service_port"]) == ("eu", {"name": "eu-relay"}, 19102)
    assert participants["admin@fleetnest.dev"]["role"] == "project_admin"
    assert "admin_port" not in participants["server"]


def _broken(edit):
    raw = copy.deepcopy(FLEET)
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("regions"), "fleet: missing \\['regions'\\]"),
        (lambda r: r.update(colour="red"), "unknown keys \\['colour'\\]"),
        (lambda r: r["regions"][0]["leaves"][1].update(name="eu_depot"), "regions\\[0\\].leaves\\[1\\].name"),
        (lambda r: r["regions"][0]["leaves"][1].update(edge_port=70000), "edge_port: expected an integer"),
        (lambda r: r["regions"][0]["leaves"][1].update(edge_port=19101), "edge_port 19101 on localhost is already"),
        (lambda r: r["regions"][0]["leaves"][1].update(name="eu"), "'eu' is used twice"),
        (lambda r: r["admins"][0].update(role="lead"), "at least one project_admin"),
        (lambda r: r["admins"][0].update(name="admin"), "admin name"),
        (lambda r: r["server"].update(host="bad host"), "server.host"),
        (lambda r: r["regions"][0].update(leaves=[]), "leaves: expected a non-empty list"),
        (lambda r: r["devices"].update(valid_days=0), "valid_days"),
        (lambda r: r["regions"][0].update(name="r" * 60), "regions\\[0\\].name"),  # "<region>-relay" > 64
        (lambda r: r.update({1: "x"}), "unknown keys \\['1'\\]"),
        (lambda r: r.update(proxy={"host_names": []}), "proxy.host_names: expected a non-empty list"),
        (lambda r: r.update(proxy={"host_names": ["bad host"]}), "proxy.host_names\\[0\\]"),
        (lambda r: r.update(proxy={"port": 1}), "fleet.proxy: unknown keys"),
    ],
)
def test_a_bad_fleet_description_is_refused_naming_the_field(edit, message):
    with pytest.raises(FleetSpecError, match=message):
        fleet_spec_from_dict(_broken(edit))


def test_a_leaf_keeps_its_internal_listener_on_loopback_while_its_edge_certificate_names_its_host():
    """FLARE opens a client's internal listener (clear TCP, for its own job processes) on its
    listening host's default_host: for a leaf on another host that must not be the leaf's
    network address, while the certificate of its edge API service must name that address."""
    remote = _broken(lambda r: r["regions"][0]["leaves"][0].update(host="depot1.fleet.example"))
    participants = {p["name"]: p for p in project_config(fleet_spec_from_dict(remote))["participants"]}
    assert participants["eu-depot-1"]["listening_host"] == {
        "default_host": "localhost",
        "host_names": ["depot1.fleet.example"],
    }
    assert participants["eu-depot-2"]["listening_host"] == {"default_host": "localhost"}


def test_the_routing_proxy_names_default_to_the_server_host():
    assert fleet_spec_from_dict(FLEET).proxy_hosts == ("localhost", "127.0.0.1")
    named = fleet_spec_from_dict(FLEET | {"proxy": {"host_names": ["proxy.fleet.example", "203.0.113.7"]}})
    assert named.proxy_hosts == ("proxy.fleet.example", "203.0.113.7")
