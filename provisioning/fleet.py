"""The fleet description: regions, their relay, regional aggregator and leaves, and the admins.

```yaml
project: fleetnest
server: {host: localhost, fed_learn_port: 8002}   # admin_port: only if it must differ
admins: [{name: admin@fleetnest.dev, org: fleetnest, role: project_admin}]
devices: {valid_days: 30}             # device certificates under the fleet's device CA
proxy: {host_names: [proxy.fleet.example, 203.0.113.7]}   # the routing proxy's TLS names (default: server host)
regions:
  - name: eu
    relay: {host: localhost, port: 9001}
    leaves:
      - {name: eu-depot-1, edge_port: 9101, expected_devices: 400}   # host: defaults to the relay's
      - {name: eu-depot-2, edge_port: 9102, expected_devices: 600}
```

Each region becomes a FLARE relay (``<region>-relay``), a cluster-tier client (``<region>``, the
regional aggregator, reaching the server through the relay) and its leaf clients (``parent:`` the
regional client, each serving devices on ``edge_port``). The routing proxy gets a TLS certificate
for ``proxy.host_names`` under the device CA. ``load_fleet_spec`` refuses anything else with the
path of the first wrong field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

# FLARE's client/relay pattern without '_', short enough that "<region>-relay" is a valid
# certificate common name (at most 64 characters)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,56}$")
HOST_NAME = re.compile(
    r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$"
)
ADMIN_NAME = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
ORG_NAME = re.compile(r"^[A-Za-z0-9_]+$")
ADMIN_ROLES = ("project_admin", "org_admin", "lead", "member")


class FleetSpecError(ValueError):
    """A fleet description that cannot be provisioned; the message names the field."""


@dataclass(frozen=True)
class Leaf:
    name: str
    host: str  # where its edge API service listens for the routing proxy
    edge_port: int
    expected_devices: int


@dataclass(frozen=True)
class Region:
    name: str
    relay_host: str
    relay_port: int
    leaves: tuple[Leaf, ...]

    @property
    def relay(self) -> str:
        return f"{self.name}-relay"


@dataclass(frozen=True)
class Admin:
    name: str
    org: str
    role: str


@dataclass(frozen=True)
class FleetSpec:
    project: str
    server_host: str
    fed_learn_port: int
    admin_port: int | None  # None: FLARE serves admins on fed_learn_port
    admins: tuple[Admin, ...]
    regions: tuple[Region, ...]
    device_valid_days: int = 30
    org: str = "fleetnest"
    proxy_hosts: tuple[str, ...] = ()  # the routing proxy's DNS names and IP addresses (its TLS certificate's)

    @property
    def leaves(self) -> tuple[Leaf, ...]:
        return tuple(leaf for region in self.regions for leaf in region.leaves)

    @property
    def expected_devices(self) -> int:
        return sum(leaf.expected_devices for leaf in self.leaves)


def _mapping(value: object, where: str, keys: set[str], required: set[str]) -> dict:
    if not isinstance(value, dict):
        raise FleetSpecError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in set(value) - keys)
    if unknown:
        raise FleetSpecError(f"{where}: unknown keys {unknown} (known: {sorted(keys)})")
    missing = sorted(required - set(value))
    if missing:
        raise FleetSpecError(f"{where}: missing {missing}")
    return value


def _text(value: object, where: str, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise FleetSpecError(f"{where}: {value!r} is not a valid {what}")
    return value


def _int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FleetSpecError(f"{where}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _port(value: object, where: str) -> int:
    return _int(value, where, 1, 65535)


def fleet_spec_from_dict(raw: object) -> FleetSpec:
    top = _mapping(
        raw,
        "fleet",
        {"project", "org", "server", "admins", "devices", "proxy", "regions"},
        {"project", "server", "admins", "regions"},
    )
    project = _text(top["project"], "fleet.project", SITE_NAME, "project name")
    org = _text(top.get("org", "fleetnest"), "fleet.org", ORG_NAME, "organisation name (letters, digits, _)")
    server = _mapping(top["server"], "fleet.server", {"host", "fed_learn_port", "admin_port"}, {"host"})
    host = _text(server["host"], "fleet.server.host", HOST_NAME, "host name")
    fl_port = _port(server.get("fed_learn_port", 8002), "fleet.server.fed_learn_port")
    admin_port = None if "admin_port" not in server else _port(server["admin_port"], "fleet.server.admin_port")
    if not isinstance(top["admins"], list) or not top["admins"]:
        raise FleetSpecError("fleet.admins: expected a non-empty list")
    admins = []
    for i, entry in enumerate(top["admins"]):
        where = f"fleet.admins[{i}]"
        entry = _mapping(entry, where, {"name", "org", "role"}, {"name"})
        role = entry.get("role", "project_admin")
        if role not in ADMIN_ROLES:
            raise FleetSpecError(f"{where}.role: {role!r}, expected one of {list(ADMIN_ROLES)}")
        admins.append(
            Admin(
                _text(entry["name"], f"{where}.name", ADMIN_NAME, "admin name (an e-mail address)"),
                _text(entry.get("org", org), f"{where}.org", ORG_NAME, "organisation name"),
                role,
            )
        )
    if not any(a.role == "project_admin" for a in admins):
        raise FleetSpecError("fleet.admins: at least one project_admin is needed to submit jobs")
    devices = _mapping(top.get("devices", {}), "fleet.devices", {"valid_days"}, set())
    valid_days = _int(devices.get("valid_days", 30), "fleet.devices.valid_days", 1, 3650)
    proxy = _mapping(top.get("proxy", {}), "fleet.proxy", {"host_names"}, set())
    default_hosts = [host] + (["127.0.0.1"] if host == "localhost" else [])
    proxy_hosts = proxy.get("host_names", default_hosts)
    if not isinstance(proxy_hosts, list) or not proxy_hosts:
        raise FleetSpecError("fleet.proxy.host_names: expected a non-empty list of host names or IP addresses")
    proxy_hosts = tuple(
        _text(name, f"fleet.proxy.host_names[{i}]", HOST_NAME, "host name") for i, name in enumerate(proxy_hosts)
    )
    if not isinstance(top["regions"], list) or not top["regions"]:
        raise FleetSpecError("fleet.regions: expected a non-empty list")
    regions = []
    for i, entry in enumerate(top["regions"]):
        where = f"fleet.regions[{i}]"
        entry = _mapping(entry, where, {"name", "relay", "leaves"}, {"name", "relay", "leaves"})
        name = _text(entry["name"], f"{where}.name", SITE_NAME, "site name (letters, digits, -)")
        relay = _mapping(entry["relay"], f"{where}.relay", {"host", "port"}, {"port"})
        relay_host = _text(relay.get("host", host), f"{where}.relay.host", HOST_NAME, "host name")
        if not isinstance(entry["leaves"], list) or not entry["leaves"]:
            raise FleetSpecError(f"{where}.leaves: expected a non-empty list")
        leaves = []
        for j, leaf in enumerate(entry["leaves"]):
            at = f"{where}.leaves[{j}]"
            leaf = _mapping(leaf, at, {"name", "host", "edge_port", "expected_devices"}, {"name", "edge_port"})
            leaves.append(
                Leaf(
                    _text(leaf["name"], f"{at}.name", SITE_NAME, "site name (letters, digits, -)"),
                    _text(leaf.get("host", relay_host), f"{at}.host", HOST_NAME, "host name"),
                    _port(leaf["edge_port"], f"{at}.edge_port"),
                    _int(leaf.get("expected_devices", 0), f"{at}.expected_devices", 0, 10**8),
                )
            )
        regions.append(Region(name, relay_host, _port(relay["port"], f"{where}.relay.port"), tuple(leaves)))
    spec = FleetSpec(project, host, fl_port, admin_port, tuple(admins), tuple(regions), valid_days, org, proxy_hosts)
    _check_unique(spec)
    return spec


def _check_unique(spec: FleetSpec) -> None:
    names = ["server"] + [n for r in spec.regions for n in (r.name, r.relay, *(leaf.name for leaf in r.leaves))]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FleetSpecError(
                f"fleet: site name {name!r} is used twice (regions, relays and leaves share one namespace)"
            )
        seen.add(name)
    ports: dict[tuple[str, int], str] = {}
    endpoints = [(spec.server_host, spec.fed_learn_port, "server.fed_learn_port")]
    if spec.admin_port is not None and spec.admin_port != spec.fed_learn_port:
        endpoints.append((spec.server_host, spec.admin_port, "server.admin_port"))
    for region in spec.regions:
        endpoints.append((region.relay_host, region.relay_port, f"{region.name} relay port"))
        endpoints += [(leaf.host, leaf.edge_port, f"{leaf.name}.edge_port") for leaf in region.leaves]
    for host, port, what in endpoints:
        if (host, port) in ports:
            raise FleetSpecError(f"fleet: {what} {port} on {host} is already {ports[(host, port)]}")
        ports[(host, port)] = what


def load_fleet_spec(path: str | Path) -> FleetSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise FleetSpecError(f"cannot read the fleet description {path}: {err}") from err
    except yaml.YAMLError as err:
        raise FleetSpecError(f"{path} is not valid YAML: {err}") from err
    return fleet_spec_from_dict(raw)
