"""The fleet's Mosquitto configuration: TLS only, every client authenticated by its certificate,
every topic behind an ACL. ``fleetnest ota broker-config`` writes it.

Two TLS listeners, each with its own CA, ACL and users (``per_listener_settings``):

- the **device listener** (``port``, default 8883): ``cafile`` = the fleet's device CA, ``crlfile``
  = its CRL, ``require_certificate``, ``use_identity_as_username`` (the certificate's common name,
  the device id, is the user name) and ``use_username_as_clientid`` (no device can take another
  client's session by reusing its client id). Its ACL is patterns only: a device writes its own
  ``<prefix>/report/%u``, ``presence/%u`` and ``health/%u`` and reads ``<prefix>/desired/+``;
- the **service listener** (``service_port``, default 8884): ``cafile`` = the service CA
  (``ota.tls``); the rollout server reads reports and presence and writes targeting hints, a
  monitor reads health and presence.

No anonymous client, no password, no plain-TCP listener. A device's report topic therefore names
the device whose key signed the TLS handshake: that is what the rollout controller checks a
report's body against. After a revocation, reload the broker (``kill -HUP``) so it reads the CRL
again, or restart it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from app_custom.durable import write_bytes_atomic

from .mqtt import PREFIX

ROLLOUT_SERVICE = "fleetnest-rollout"
MONITOR_SERVICE = "fleetnest-monitor"


class BrokerConfigError(ValueError):
    """The broker configuration cannot be written (the message says why)."""


@dataclass(frozen=True)
class BrokerFiles:
    """The files a broker configuration refers to (all absolute)."""

    device_ca: Path  # the device CA's certificate
    device_crl: Path  # and its revocation list
    service_ca: Path  # the service CA's certificate
    server_cert: Path  # the broker's TLS certificate (from the service CA)
    server_key: Path


@dataclass(frozen=True)
class BrokerConfig:
    files: BrokerFiles
    host: str = "0.0.0.0"  # noqa: S104 - the device listener faces the fleet
    port: int = 8883
    service_host: str = "127.0.0.1"
    service_port: int = 8884
    prefix: str = PREFIX
    services: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # name -> (reads, writes)
    persistence: bool = False
    user: str | None = None  # the account Mosquitto drops to when started as root (it must read the key)

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#%") or self.prefix.endswith("/"):
            raise BrokerConfigError(f"bad topic prefix {self.prefix!r}")
        for port in (self.port, self.service_port):
            if not 0 < port < 65536:
                raise BrokerConfigError(f"bad port {port}")
        for path in vars(self.files).values():
            if not Path(path).is_absolute():
                raise BrokerConfigError(f"{path}: the broker needs absolute paths")

    def default_services(self) -> dict[str, tuple[list[str], list[str]]]:
        p = self.prefix
        return {
            ROLLOUT_SERVICE: ([f"{p}/report/+", f"{p}/presence/+"], [f"{p}/desired/+"]),
            MONITOR_SERVICE: ([f"{p}/health/+", f"{p}/presence/+", f"{p}/report/+"], []),
        }

    def device_acl(self) -> str:
        p = self.prefix
        return "\n".join(
            [
                "# devices: the user name is the common name of the device certificate (its device id)",
                f"pattern write {p}/report/%u",
                f"pattern write {p}/presence/%u",
                f"pattern write {p}/health/%u",
                f"pattern read {p}/desired/+",
                "",
            ]
        )

    def service_acl(self) -> str:
        lines = ["# fleet services: the user name is the common name of the service CA's client certificate"]
        for name, (reads, writes) in (self.services or self.default_services()).items():
            if not name or any(c.isspace() for c in name):
                raise BrokerConfigError(f"bad service name {name!r}")
            lines.append(f"user {name}")
            lines += [f"topic read {topic}" for topic in reads]
            lines += [f"topic write {topic}" for topic in writes]
        return "\n".join(lines) + "\n"

    def _listener(self, port: int, host: str, cafile: Path, acl: Path, crlfile: Path | None = None) -> list[str]:
        """One TLS listener that takes only clients with a certificate from ``cafile``, each named by
        its certificate's common name and held to ``acl``."""
        f = self.files
        return [
            f"listener {port} {host}",
            "allow_anonymous false",
            f"cafile {cafile}",
            *([f"crlfile {crlfile}"] if crlfile else []),
            f"certfile {f.server_cert}",
            f"keyfile {f.server_key}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            f"acl_file {acl}",
            "",
        ]

    def mosquitto_conf(self, device_acl: Path, service_acl: Path) -> str:
        f = self.files
        return "\n".join(
            [
                "# written by `fleetnest ota broker-config`: TLS and client certificates only",
                "per_listener_settings true",
                f"persistence {'true' if self.persistence else 'false'}",
                *([f"user {self.user}"] if self.user else []),
                "",
                "# devices (the fleet's device CA and its CRL)",
                *self._listener(self.port, self.host, f.device_ca, device_acl, f.device_crl),
                "# fleet services (the service CA)",
                *self._listener(self.service_port, self.service_host, f.service_ca, service_acl),
            ]
        )

    def write(self, out: str | os.PathLike) -> Path:
        """``out/mosquitto.conf``, ``out/devices.acl`` and ``out/services.acl``; returns the conf."""
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        device_acl, service_acl = out / "devices.acl", out / "services.acl"
        write_bytes_atomic(device_acl, self.device_acl().encode(), 0o644)
        write_bytes_atomic(service_acl, self.service_acl().encode(), 0o644)
        conf = out / "mosquitto.conf"
        write_bytes_atomic(conf, self.mosquitto_conf(device_acl, service_acl).encode(), 0o644)
        return conf
