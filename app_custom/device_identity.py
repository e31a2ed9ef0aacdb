"""What a leaf trusts a device for: its certificate under the fleet's device CA, and messages
signed with that certificate's key.

``verify_device_certificate`` checks one certificate against the CA and its CRL (both in the leaf's
``local/device_ca/``, written by ``fleetnest provision``). ``DeviceAuthenticator`` opens a device's
``signed`` envelope (certificate, payload, ECDSA P-256 signature over a domain-separated payload)
and returns the device id the payload may be attributed to; it re-reads the CRL whenever the file
changes, so a revocation takes effect without restarting the leaf, and remembers the certificates
it verified under the CRL in force (a signature check per message, not a chain check). Replays are
the payload's business: secure-aggregation messages are bound to (job, round, cohort, stage,
sender), poll tokens to a leaf's single-use challenge (``edge_messages.PollChallenges``), and the
caller checks that the sender is the device id returned here.

``FailureLimiter`` is the leaf's memory of request sources that keep failing these checks (see its
docstring for why no one's failures can hold back a device that presents its own certificate).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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
KNOWN_CERTIFICATES = 100_000  # verified device certificates a leaf remembers (one per device, normally)


class IdentityError(ValueError):
    """A device identity that cannot be issued or is not to be trusted; the message says why."""


class CertificateRefused(IdentityError):
    """A device certificate a leaf does not trust (foreign, expired, revoked, not a device's): no
    signature made with its key will ever be accepted, whoever presents it."""


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
    if crl.next_update_utc is None:
        raise IdentityError("the revocation list names no next update: it would be good forever; republish it")
    if crl.next_update_utc < now:
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


@dataclass(frozen=True)
class SignedEnvelope:
    """A device's envelope, read but not yet verified: nothing in it is to be trusted yet."""

    cert_pem: bytes
    payload: bytes
    signature: bytes


def read_envelope(envelope: object) -> SignedEnvelope:
    """The fields of a signed envelope, or ``IdentityError`` if it is not one (nothing verified)."""
    if not isinstance(envelope, (bytes, bytearray)) or len(envelope) > MAX_ENVELOPE_BYTES:
        raise IdentityError("expected a signed envelope of bytes")
    try:
        raw = json.loads(envelope)
        if not isinstance(raw, dict) or set(raw) != {"cert", "payload", "sig"}:
            raise ValueError("fields must be cert, payload and sig")
        cert_pem, payload, signature = (base64.b64decode(raw[k], validate=True) for k in ("cert", "payload", "sig"))
    except (ValueError, TypeError) as err:
        raise IdentityError(f"malformed signed envelope: {err}") from err
    return SignedEnvelope(cert_pem, payload, signature)


def sign_message(payload: bytes, key_pem: bytes, cert_pem: bytes) -> bytes:
    """The device's envelope for ``payload``: its certificate, the payload and its signature."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError("device keys must be elliptic-curve (P-256) keys")
    signature = key.sign(SIGNING_LABEL + payload, ec.ECDSA(hashes.SHA256()))
    fields = {"cert": cert_pem, "payload": payload, "sig": signature}
    return json.dumps({k: base64.b64encode(v).decode() for k, v in fields.items()}).encode()


@dataclass(frozen=True)
class _Verified:
    device: str
    public_key: ec.EllipticCurvePublicKey
    valid_from: dt.datetime
    valid_until: dt.datetime  # the certificate's end, or the CRL's next update if sooner


class DeviceAuthenticator:
    """A leaf's check of signed device envelopes against the device CA in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            self._ca_pem = (self.dir / "ca.pem").read_bytes()
        except OSError as err:
            raise IdentityError(f"no device CA certificate in {self.dir}: {err}") from err
        self._crl_pem, self._crl_stamp = b"", None
        self._crl_next_update: dt.datetime | None = None
        self._known: dict[bytes, _Verified] = {}  # sha256 of a certificate verified under the CRL in force
        self._lock = threading.Lock()
        self._load_crl()

    def _load_crl(self) -> bool:
        path = self.dir / "crl.pem"
        try:
            stat = path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._crl_stamp:
                crl_pem = path.read_bytes()
                with self._lock:
                    self._crl_pem, self._crl_stamp = crl_pem, stamp
                    self._known = {}  # a new CRL: every certificate is checked against it again
                    try:
                        self._crl_next_update = x509.load_pem_x509_crl(crl_pem).next_update_utc
                    except ValueError:
                        self._crl_next_update = None  # unreadable: verify_device_certificate says why
                return True
            return False
        except OSError as err:
            raise IdentityError(f"no revocation list in {self.dir}: {err}") from err

    def ca_and_crl(self) -> tuple[bytes, bytes]:
        """The device CA's certificate and the CRL in force (re-read if its file changed): what
        devices check one another's secure-aggregation keys with."""
        self._load_crl()
        return self._ca_pem, self._crl_pem

    @property
    def crl_stamp(self) -> tuple | None:
        """Identifies the CRL in force, after re-reading it if its file changed: when it differs from
        the one a device was checked under, check that device again."""
        self._load_crl()
        return self._crl_stamp

    def open(self, envelope: bytes, now: dt.datetime | None = None) -> tuple[str, bytes]:
        """(device id, payload) of a genuine envelope, or ``IdentityError`` saying why not."""
        return self.open_envelope(read_envelope(envelope), now)

    def open_envelope(self, envelope: SignedEnvelope, now: dt.datetime | None = None) -> tuple[str, bytes]:
        """``open`` for an envelope already read (``read_envelope``)."""
        verified = self._certificate(envelope.cert_pem, now)
        try:
            verified.public_key.verify(envelope.signature, SIGNING_LABEL + envelope.payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as err:
            raise IdentityError(f"the signature does not match {verified.device}'s certificate") from err
        return verified.device, envelope.payload

    def _certificate(self, cert_pem: bytes, now: dt.datetime | None) -> _Verified:
        self._load_crl()
        digest = hashlib.sha256(cert_pem).digest()
        at = now or _now()
        hit = self._known.get(digest)
        if hit is not None and hit.valid_from <= at <= hit.valid_until:
            return hit
        with self._lock:
            ca_pem, crl_pem, crl_next = self._ca_pem, self._crl_pem, self._crl_next_update
        try:
            device = verify_device_certificate(cert_pem, ca_pem, crl_pem, now)
        except IdentityError as err:
            raise CertificateRefused(str(err)) from err
        cert = x509.load_pem_x509_certificate(cert_pem)
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CertificateRefused(f"{device}'s certificate does not hold an elliptic-curve key")
        until = cert.not_valid_after_utc if crl_next is None else min(cert.not_valid_after_utc, crl_next)
        verified = _Verified(device, public_key, cert.not_valid_before_utc, until)
        with self._lock:
            if crl_pem is self._crl_pem:  # not if the CRL changed meanwhile
                if len(self._known) >= KNOWN_CERTIFICATES:
                    self._known = {}
                self._known[digest] = verified
        return verified


class FailureLimiter:
    """Request sources that keep failing a leaf's checks, each ignored for a while after ``threshold``
    failures within ``period`` seconds. At most ``capacity`` sources are tracked, the stalest
    forgotten first: a flood of new sources only shortens penalties, never extends one.

    What a source is, is the caller's choice, and the choice decides who can be locked out. The
    routing proxy forwards no peer address (a leaf sees only the proxy) and the device id a
    request names is anyone's to claim, so a leaf keys penalties that hold requests back by
    (claimed id, the certificate presented) and counts only failures of that certificate itself
    (foreign, expired, revoked) or of an unreadable envelope: the owner of the id presents its
    own, good certificate, which no one else's failures can mark (fleet_executor).
    """

    def __init__(
        self,
        threshold: int = 5,
        period: float = 60.0,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold, self.period, self.capacity = threshold, period, capacity
        self._clock = clock
        self._sources: OrderedDict[object, list[float]] = OrderedDict()  # -> [failures, since, ignored until]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sources)

    def clear(self) -> None:
        with self._lock:
            self._sources.clear()

    def ignored_for(self, source: object) -> float:
        """Seconds for which ``source`` is still ignored (0: it is not)."""
        with self._lock:
            entry = self._sources.get(source)
            return max(0.0, entry[2] - self._clock()) if entry else 0.0

    def failed(self, source: object) -> bool:
        """Count one failed check of ``source``; True when this one starts its penalty."""
        now = self._clock()
        with self._lock:
            entry = self._sources.pop(source, None)
            if entry is None or now - entry[1] > self.period:
                entry = [0.0, now, entry[2] if entry else 0.0]
            entry[0] += 1
            starts = entry[0] >= self.threshold and entry[2] <= now
            if starts:
                entry[:] = [0.0, now, now + self.period]
            self._sources[source] = entry
            while len(self._sources) > self.capacity:
                self._sources.popitem(last=False)
            return starts
