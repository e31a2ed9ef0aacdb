"""What a leaf trusts a device for: its certificate under the fleet's device CA, and messages
signed with that certificate's key.

``verify_device_certificate`` checks one certificate against the CA and its CRL (both in the leaf's
``local/device_ca/``, written by ``fleetnest provision``). ``DeviceAuthenticator`` opens a device's
``signed`` envelope (certificate, payload, ECDSA P-256 signature over a domain-separated payload)
and returns the device id the payload may be attributed to; it re-reads the CRL whenever the file
changes, so a revocation takes effect without restarting the leaf. Replays are the payload's
business: secure-aggregation messages are bound to (job, round, cohort, stage, sender), and the
caller checks that the sender is the device id returned here.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # an X.509 common name holds 64
URN = "urn:fleetnest:device:"
SIGNING_LABEL = b"fleetnest-device-message|"
MAX_ENVELOPE_BYTES = 64 << 20


class IdentityError(ValueError):
    """A device identity that cannot be issued or is not to be trusted; the message says why."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def verify_device_certificate(cert_pem: bytes, ca_pem: bytes, crl_pem: bytes, now: dt.datetime | None = None) -> str:
    """The device id a leaf may trust ``cert_pem`` for, or ``IdentityError`` saying why not:
    not issued by this fleet's device CA, expired or not yet valid, revoked, not a device
    certificate, or a CRL that is not the CA's or is out of date."""
    now = now or _now()
    if now.tzinfo is None:
        raise IdentityError("now must be a timezone-aware time")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise IdentityError(f"not a PEM certificate: {err}") from err
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as err:
        raise IdentityError(f"the device CA certificate or its revocation list is unreadable: {err}") from err
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise IdentityError(f"not issued by this fleet's device CA ({cert.issuer.rfc4514_string()})") from err
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):
        raise IdentityError("the revocation list is not signed by this fleet's device CA")
    if crl.next_update_utc is not None and crl.next_update_utc < now:
        raise IdentityError(f"the revocation list expired at {crl.next_update_utc.isoformat()}: republish it")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError(
            f"certificate {cert.serial_number} is valid {cert.not_valid_before_utc.isoformat()} to"
            f" {cert.not_valid_after_utc.isoformat()}, not at {now.isoformat()}"
        )
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise IdentityError(f"certificate {cert.serial_number} has been revoked")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as err:
        raise IdentityError(f"not a device certificate: {err}") from err
    if constraints.ca or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise IdentityError("not a device certificate (a CA, or not for client authentication)")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not DEVICE_ID.match(str(names[0].value)):
        raise IdentityError("the certificate names no valid device id")
    return str(names[0].value)


def sign_message(payload: bytes, key_pem: bytes, cert_pem: bytes) -> bytes:
    """The device's envelope for ``payload``: its certificate, the payload and its signature."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError("device keys must be elliptic-curve (P-256) keys")
    signature = key.sign(SIGNING_LABEL + payload, ec.ECDSA(hashes.SHA256()))
    fields = {"cert": cert_pem, "payload": payload, "sig": signature}
    return json.dumps({k: base64.b64encode(v).decode() for k, v in fields.items()}).encode()


class DeviceAuthenticator:
    """A leaf's check of signed device envelopes against the device CA in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            self._ca_pem = (self.dir / "ca.pem").read_bytes()
        except OSError as err:
            raise IdentityError(f"no device CA certificate in {self.dir}: {err}") from err
        self._crl_pem, self._crl_stamp = b"", None
        self._load_crl()

    def _load_crl(self) -> bool:
        path = self.dir / "crl.pem"
        try:
            stat = path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._crl_stamp:
                self._crl_pem, self._crl_stamp = path.read_bytes(), stamp
                return True
            return False
        except OSError as err:
            raise IdentityError(f"no revocation list in {self.dir}: {err}") from err

    @property
    def crl_stamp(self) -> tuple | None:
        """Identifies the CRL in force, after re-reading it if its file changed: when it differs from
        the one a device was checked under, check that device again."""
        self._load_crl()
        return self._crl_stamp

    def open(self, envelope: bytes, now: dt.datetime | None = None) -> tuple[str, bytes]:
        """(device id, payload) of a genuine envelope, or ``IdentityError`` saying why not."""
        if not isinstance(envelope, (bytes, bytearray)) or len(envelope) > MAX_ENVELOPE_BYTES:
            raise IdentityError("expected a signed envelope of bytes")
        try:
            raw = json.loads(envelope)
            if not isinstance(raw, dict) or set(raw) != {"cert", "payload", "sig"}:
                raise ValueError("fields must be cert, payload and sig")
            cert_pem, payload, signature = (base64.b64decode(raw[k], validate=True) for k in ("cert", "payload", "sig"))
        except (ValueError, TypeError) as err:
            raise IdentityError(f"malformed signed envelope: {err}") from err
        self._load_crl()
        device = verify_device_certificate(cert_pem, self._ca_pem, self._crl_pem, now)
        public_key = x509.load_pem_x509_certificate(cert_pem).public_key()
        try:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise InvalidSignature
            public_key.verify(signature, SIGNING_LABEL + payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as err:
            raise IdentityError(f"the signature does not match {device}'s certificate") from err
        return device, payload
