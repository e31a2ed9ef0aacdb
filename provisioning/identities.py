"""Device identities: certificates under the fleet's own device CA, renewed and revoked without
re-provisioning the FLARE project.

Devices are not FLARE participants (they reach a leaf through the routing proxy), so their
certificates come from a separate CA that only the leaves trust, never from the project's root
CA: a device key stolen from a robot must not be able to open an mTLS connection into FLARE's
own network. The CA lives in ``<state>/device_ca/`` (key owner-only); every issued certificate
is recorded in ``issued.json``, every revocation in ``revoked.json`` and in ``crl.pem``, an X.509
CRL signed by the CA that leaves load (``app_custom.device_identity``).

The same CA issues the routing proxy's TLS certificate (``issue_server``): devices already hold
the device CA, and the proxy, the fleet's most exposed host, then holds nothing FLARE's own mTLS
network would accept (its certificate is for server authentication only, so no leaf takes it for
a device either). It is recorded in ``servers.json``.

A device normally keeps its key and sends a CSR (``issue(csr_pem=...)``); factory provisioning may
let the CA generate the key. Rotation is a new certificate for the same device id: the old one
stays valid until it expires unless it is revoked (``revoke_previous``), so a running device can
switch without missing a round.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app_custom.device_identity import DEVICE_ID, URN, IdentityError, verify_device_certificate
from app_custom.durable import write_bytes_atomic, write_json_atomic

from .certificates import create_ca, private_pem, sign_certificate
from .certificates import host_names as alt_names

__all__ = ["DeviceCA", "IdentityError", "IssuedIdentity", "verify_device_certificate"]

CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
CRL_VALID_DAYS = 7  # leaves refuse a CRL past its next update: republish at least weekly
SERVER_VALID_DAYS = 90  # the routing proxy's certificate: renewed with `fleetnest provision proxy`


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class IssuedIdentity:
    device_id: str
    serial: int
    not_after: dt.datetime
    cert_pem: bytes
    key_pem: bytes | None  # None when the device sent a CSR and keeps its key


class DeviceCA:
    """The fleet's device CA in ``directory`` (created by ``create``, opened by the constructor)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            self.cert = x509.load_pem_x509_certificate((self.dir / "ca.pem").read_bytes())
            self._key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), password=None)
        except FileNotFoundError as err:
            raise IdentityError(f"no device CA in {self.dir} (run `fleetnest provision` first): {err}") from err

    @classmethod
    def create(cls, directory: str | Path, project: str, now: dt.datetime | None = None) -> DeviceCA:
        """A new CA, unless ``directory`` already holds one (then that one: re-provisioning keeps it)."""
        directory = Path(directory)
        if (directory / "ca.pem").exists():
            ca = cls(directory)
            ca.publish_crl(now)  # every provisioning run refreshes the CRL's validity
            return ca
        now = now or _now()
        create_ca(directory, f"{project[:40]} device CA", now)
        ca = cls(directory)
        ca.publish_crl(now)
        return ca

    # ---- records ------------------------------------------------------------------------------
    def _load(self, name: str) -> list[dict]:
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else []

    def issued(self, device_id: str | None = None) -> list[dict]:
        return [r for r in self._load("issued.json") if device_id is None or r["device_id"] == device_id]

    def revoked_serials(self) -> set[int]:
        return {int(r["serial"]) for r in self._load("revoked.json")}

    # ---- issue, rotate, revoke -------------------------------------------------------------------
    def issue(
        self,
        device_id: str,
        valid_days: int,
        csr_pem: bytes | None = None,
        now: dt.datetime | None = None,
        revoke_previous: bool = False,
    ) -> IssuedIdentity:
        """A certificate for ``device_id`` (a new one if it has some: that is rotation)."""
        if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
            raise IdentityError(f"device id {device_id!r}: letters, digits, '.', '_' and '-', at most 64")
        if isinstance(valid_days, bool) or not isinstance(valid_days, int) or not 1 <= valid_days <= 3650:
            raise IdentityError(f"valid_days must be an integer in [1, 3650], got {valid_days!r}")
        now = now or _now()
        key_pem = None
        if csr_pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
            key_pem = private_pem(key)
        else:
            try:
                csr = x509.load_pem_x509_csr(csr_pem)
            except ValueError as err:
                raise IdentityError(f"the CSR is not a PEM certificate request: {err}") from err
            if not csr.is_signature_valid:
                raise IdentityError("the CSR's signature does not match its key (not signed by the device's key)")
            names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if [n.value for n in names] != [device_id]:
                raise IdentityError(f"the CSR is for {[n.value for n in names]}, not {device_id!r}")
            public_key = csr.public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
                raise IdentityError("device keys must be P-256 (secp256r1) keys")
        previous = [int(r["serial"]) for r in self.issued(device_id)] if revoke_previous else []
        urn = [x509.UniformResourceIdentifier(URN + device_id)]
        cert = sign_certificate(self._key, self.cert, device_id, public_key, CLIENT, now, valid_days, urn)
        not_after = cert.not_valid_after_utc
        record = {"device_id": device_id, "serial": str(cert.serial_number), "not_after": not_after.isoformat()}
        write_json_atomic(self.dir / "issued.json", self._load("issued.json") + [record])
        for serial in previous:
            self.revoke(serial, now, reason="superseded")
        return IssuedIdentity(
            device_id, cert.serial_number, not_after, cert.public_bytes(serialization.Encoding.PEM), key_pem
        )

    def issue_server(
        self, name: str, host_names: list[str] | tuple[str, ...], valid_days: int = SERVER_VALID_DAYS, now=None
    ) -> IssuedIdentity:
        """A TLS server certificate and a new key for ``host_names`` (DNS names or IP addresses),
        for server authentication only: never a device's (no client authentication)."""
        if not host_names:
            raise IdentityError("a server certificate needs at least one host name")
        now = now or _now()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = sign_certificate(
            self._key, self.cert, name, key.public_key(), SERVER, now, valid_days, alt_names(host_names)
        )
        not_after = cert.not_valid_after_utc
        record = {"name": name, "hosts": list(host_names), "serial": str(cert.serial_number)}
        record["not_after"] = not_after.isoformat()
        write_json_atomic(self.dir / "servers.json", self._load("servers.json") + [record])
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        return IssuedIdentity(name, cert.serial_number, not_after, cert_pem, private_pem(key))

    def revoke(self, target: str | int, now: dt.datetime | None = None, reason: str = "revoked") -> list[int]:
        """Revoke one certificate (a serial) or every certificate of a device (its id); republish the CRL."""
        now = now or _now()
        issued = self._load("issued.json")
        if isinstance(target, int):
            serials = [target] if any(int(r["serial"]) == target for r in issued) else []
        else:
            serials = [int(r["serial"]) for r in issued if r["device_id"] == target]
        if not serials:
            raise IdentityError(f"no certificate issued for {target!r} by this device CA")
        revoked = self._load("revoked.json")
        known = {int(r["serial"]) for r in revoked}
        revoked += [
            {"serial": str(s), "revoked_at": now.isoformat(), "reason": reason} for s in serials if s not in known
        ]
        write_json_atomic(self.dir / "revoked.json", revoked)
        self.publish_crl(now)
        return serials

    def publish_crl(self, now: dt.datetime | None = None) -> Path:
        now = now or _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=CRL_VALID_DAYS))
        )
        for record in self._load("revoked.json"):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(record["serial"]))
                .revocation_date(dt.datetime.fromisoformat(record["revoked_at"]))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        path = self.dir / "crl.pem"
        write_bytes_atomic(path, crl.public_bytes(serialization.Encoding.PEM))
        return path

    def due_for_renewal(self, within_days: int, now: dt.datetime | None = None) -> list[str]:
        """Devices whose newest unrevoked certificate expires within ``within_days``."""
        now, revoked, newest = now or _now(), self.revoked_serials(), {}
        for record in self.issued():
            if int(record["serial"]) in revoked:
                continue
            not_after = dt.datetime.fromisoformat(record["not_after"])
            if record["device_id"] not in newest or not_after > newest[record["device_id"]]:
                newest[record["device_id"]] = not_after
        return sorted(d for d, t in newest.items() if t - now <= dt.timedelta(days=within_days))
