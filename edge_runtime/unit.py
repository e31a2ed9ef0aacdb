"""The systemd unit's device-specific part, written at install time from the daemon's configuration.

``fleetnest-edge.service`` denies every IP address but localhost (``IPAddressDeny=any``). The
addresses this device talks to come from ``/etc/fleetnest/edge.yaml`` and are resolved here, once,
into the drop-in ``network.conf``: the fleet proxy, the OTA repository, the MQTT broker, and the name
servers of ``/etc/resolv.conf`` (the daemon resolves those names again at run time). With a
``fleet`` section, ``credentials.conf`` hands the device key and certificate to the service with
``LoadCredential=``: the files stay root-only on disk and the daemon reads its private copies from
``$CREDENTIALS_DIRECTORY`` (``identity_dir``).

python -m edge_runtime.unit --config /etc/fleetnest/edge.yaml --out /etc/systemd/system/fleetnest-edge.service.d

Public names: ``write_drop_ins``, ``allowed_addresses``, ``identity_dir``, ``DropInError``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from app_custom.durable import write_bytes_atomic

from .config import EdgeConfig, EdgeConfigError

NETWORK_DROP_IN, CREDENTIALS_DROP_IN = "network.conf", "credentials.conf"
DEVICE_CA_FILE = "device_ca.pem"  # beside the key: the fleet device CA (routing proxy, peers' keys)
# the credential ids are the file names the fleet client reads
IDENTITY_FILES = ("device.key", "device.crt", DEVICE_CA_FILE)
RESOLV_CONF = Path("/etc/resolv.conf")
HEADER = (
    "# written by python -m edge_runtime.unit from {config}; rerun it (and systemctl daemon-reload) after a change\n"
)


class DropInError(EdgeConfigError):
    """A configuration the unit's drop-ins cannot be written for (a name that does not resolve, a bad address)."""


def endpoints(config: EdgeConfig) -> dict[str, str]:
    """The hosts the daemon connects to, by the setting that names them."""
    hosts = {}
    for section, setting in (("fleet", "proxy"), ("ota", "repository")):
        values = config.section(section)
        if values:
            hosts[f"{section}.{setting}"] = urlsplit(values[setting]).hostname or ""
    telemetry = config.section("telemetry")
    if telemetry and telemetry["mqtt_host"]:
        hosts["telemetry.mqtt_host"] = telemetry["mqtt_host"]
    return hosts


def resolve(setting: str, host: str) -> list[str]:
    """Every address ``host`` has now (an address literal stands for itself)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise DropInError(
            f"{setting}: {host!r} does not resolve at install time ({err}); give its addresses with --allow"
        ) from err
    return sorted({info[4][0].split("%")[0] for info in infos}, key=_order)


def nameservers(resolv_conf: Path) -> list[str]:
    """The name servers of a resolv.conf (none when it is missing)."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
            except ValueError as err:
                raise DropInError(f"{resolv_conf}:{number}: {err}") from err
    return found


def allowed_addresses(
    config: EdgeConfig, resolv_conf: Path | None = RESOLV_CONF, extra: Iterable[str] = ()
) -> dict[str, list[str]]:
    """{where an address comes from: its addresses or networks}, loopback left out (the unit allows localhost)."""
    sources = {setting: resolve(setting, host) for setting, host in endpoints(config).items()}
    if resolv_conf is not None:
        sources[str(resolv_conf)] = nameservers(resolv_conf)
    try:
        sources["--allow"] = [_normal(net) for net in extra]
    except ValueError as err:
        raise DropInError(f"--allow: {err}") from err
    allowed, seen = {}, set()
    for source, addresses in sources.items():
        kept = [a for a in map(_normal, addresses) if not ipaddress.ip_network(a).is_loopback and a not in seen]
        seen.update(kept)
        if kept:
            allowed[source] = kept
    return allowed


def _normal(address: str) -> str:
    """An address as itself, a network as CIDR (host bits cleared)."""
    network = ipaddress.ip_network(address, strict=False)
    return str(network.network_address if network.prefixlen == network.max_prefixlen else network)


def network_drop_in(allowed: Mapping[str, list[str]], config_path: str) -> str:
    lines = [HEADER.format(config=config_path), "[Service]\n"]
    for source, addresses in allowed.items():
        lines.append(f"# {source}\nIPAddressAllow={' '.join(addresses)}\n")
    return "".join(lines)


def credentials_drop_in(identity: Path, config_path: str) -> str:
    lines = [HEADER.format(config=config_path), "[Service]\n"]
    lines += [f"LoadCredential={name}:{identity / name}\n" for name in IDENTITY_FILES]
    return "".join(lines)


def write_drop_ins(
    config: EdgeConfig,
    out: Path,
    resolv_conf: Path | None = RESOLV_CONF,
    extra: Iterable[str] = (),
    config_path: str = "the edge configuration",
) -> list[Path]:
    """Write ``network.conf`` (and ``credentials.conf`` with a ``fleet`` section, else remove a stale one)
    into the unit's drop-in folder ``out``; the paths written, in the order systemd reads them."""
    network = network_drop_in(allowed_addresses(config, resolv_conf, extra), config_path)
    out.mkdir(mode=0o755, parents=True, exist_ok=True)
    written = []
    fleet = config.section("fleet")
    if fleet:
        path = out / CREDENTIALS_DROP_IN
        write_bytes_atomic(path, credentials_drop_in(Path(fleet["identity"]), config_path).encode(), 0o644)
        written.append(path)
    else:
        (out / CREDENTIALS_DROP_IN).unlink(missing_ok=True)
    write_bytes_atomic(out / NETWORK_DROP_IN, network.encode(), 0o644)
    written.append(out / NETWORK_DROP_IN)
    return written


def identity_dir(configured: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the daemon reads ``device.key`` and ``device.crt``: the credentials systemd loaded for it
    (``$CREDENTIALS_DIRECTORY``) when it has both, else the configured folder."""
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and all((Path(credentials) / name).is_file() for name in IDENTITY_FILES):
        return Path(credentials)
    return configured


def _order(address: str) -> tuple[int, int]:
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.unit", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the daemon's configuration (/etc/fleetnest/edge.yaml)")
    parser.add_argument("--out", required=True, help="the unit's drop-in folder")
    parser.add_argument("--resolv-conf", default=str(RESOLV_CONF), help="whose name servers to allow ('' for none)")
    parser.add_argument("--allow", action="append", default=[], help="one more address or network (CIDR)")
    args = parser.parse_args(argv)
    try:
        config = EdgeConfig.load(args.config)
        written = write_drop_ins(
            config, Path(args.out), Path(args.resolv_conf) if args.resolv_conf else None, args.allow, args.config
        )
    except EdgeConfigError as err:
        print(f"python -m edge_runtime.unit: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
