"""TLS for the fleet's messaging and downloads: who proves what to whom.

- Devices log in to the MQTT broker with their device certificate (``provisioning.identities``:
  the fleet's device CA, common name = device id); the broker's device listener checks it against
  the device CA and its CRL and takes the common name as the user name its topic ACL is written for.
- The broker and the OTA server prove themselves to devices with server certificates from the
  fleet's *service CA* (this module): a device trusts that CA's certificate for TLS, and TUF's
  signatures for everything it installs.
- Fleet services (the rollout server, monitoring) log in to the broker's service listener with
  client certificates from the service CA; a device certificate is not accepted there, and a
  service certificate is not accepted on the device listener.

``ServiceCA.create(dir, project)`` / ``ServiceCA(dir)``; ``issue_server(name, hosts)`` and
``issue_client(name)`` write ``<name>.pem`` and ``<name>.key`` (owner-only) into a folder of the
caller's choice. ``TlsFiles`` names a CA file and an optional client certificate and key, and
makes the ``ssl.SSLContext`` for either side.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from app_custom.durable import write_bytes_atomic
from provisioning.certificates import create_ca, host_names, private_pem, sign_certificate


class TlsError(ValueError):
    """A certificate, key or CA that cannot be used (the message says which and why)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as files."""

    cert_file: Path
    key_file: Path


class ServiceCA:
    """The fleet's service CA in ``directory`` (``ca.pem``, ``ca.key`` owner-only)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        try:
            self.cert = x509.load_pem_x509_certificate((self.dir / "ca.pem").read_bytes())
            self._key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise TlsError(f"no usable service CA in {self.dir}: {e}") from e

    @property
    def cert_file(self) -> Path:
        return self.dir / "ca.pem"

    @classmethod
    def create(cls, directory: str | os.PathLike, project: str) -> ServiceCA:
        """A new service CA, unless ``directory`` holds one already (then that one)."""
        directory = Path(directory)
        if (directory / "ca.pem").exists():
            return cls(directory)
        create_ca(directory, f"{project[:40]} service CA", _now())
        return cls(directory)

    def _issue(
        self, name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName], out: Path, valid_days: int
    ) -> Identity:
        if not name or len(name) > 64:
            raise TlsError(f"a certificate name must be 1 to 64 characters, got {name!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = sign_certificate(self._key, self.cert, name, key.public_key(), usage, _now(), valid_days, sans)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        identity = Identity(out / f"{name}.pem", out / f"{name}.key")
        write_bytes_atomic(identity.key_file, private_pem(key), 0o600)
        write_bytes_atomic(identity.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return identity

    def issue_server(self, name: str, hosts: list[str], out: str | os.PathLike, valid_days: int = 365) -> Identity:
        """A TLS server certificate for ``hosts`` (DNS names or IP addresses): the broker, the OTA server."""
        if not hosts:
            raise TlsError("a server certificate needs at least one host name or address")
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH, host_names(hosts), Path(out), valid_days)

    def issue_client(self, name: str, out: str | os.PathLike, valid_days: int = 365) -> Identity:
        """A client certificate for a fleet service (the rollout server, a monitor) on the broker."""
        return self._issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, [], Path(out), valid_days)


@dataclass(frozen=True)
class TlsFiles:
    """What one side of a TLS connection uses: the CA it checks the other side against, and its own
    certificate and key (a client's for mutual TLS; a server's)."""

    ca_file: Path | None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsError("a certificate needs its key and a key its certificate: give both or neither")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not Path(path).is_file():
                raise TlsError(f"{path}: no such file")

    def client_context(self) -> ssl.SSLContext:
        """Checks the server against ``ca_file`` (the system's trusted CAs without one) and its host
        name; presents the client certificate, if any."""
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        """Presents the server certificate; with ``require_client_cert``, refuses clients without a
        certificate from ``ca_file``."""
        if self.cert_file is None:
            raise TlsError("a TLS server needs its certificate and key")
        if require_client_cert and self.ca_file is None:
            raise TlsError("requiring client certificates needs the CA file that checks them")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        if require_client_cert:
            context.load_verify_locations(cafile=str(self.ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        return context
