"""Device certificates for secure aggregation against a lying aggregator (Bonawitz et al. 2017, §6).

The aggregator relays every key advert, so a device can only trust a peer's keys that the peer
signed itself: ``CertificateSigner`` signs with the device's own key (ECDSA P-256 under its
certificate from the fleet's device CA); ``CertificateAuthority`` checks a peer's certificate
against that CA and its revocation list (``app_custom.device_identity``, the same check a leaf
makes) and the signature against the certificate. Every payload is domain-separated by its
caller, so a signature made for one purpose is never valid for another.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app_custom.device_identity import IdentityError, verify_device_certificate

MAX_CERTIFICATE_BYTES = 4096
MAX_SIGNATURE_BYTES = 80  # a DER ECDSA P-256 signature is at most 72 bytes


class PeerAuthenticationError(ValueError):
    """A peer's certificate or signature that is not to be trusted; the message says why."""


class CertificateSigner:
    """What a device signs its adverts and consistency answers with."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PeerAuthenticationError("device keys must be elliptic-curve (P-256) keys")
        if key.public_key() != x509.load_pem_x509_certificate(cert_pem).public_key():
            raise PeerAuthenticationError("the device key does not belong to its certificate")
        self._key = key
        self.certificate = bytes(cert_pem)

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload, ec.ECDSA(hashes.SHA256()))


class CertificateAuthority:
    """Checks that ``payload`` was signed by the certificate of ``device`` under the fleet's device CA."""

    def __init__(self, ca_pem: bytes, crl_pem: bytes) -> None:
        self._ca_pem, self._crl_pem = bytes(ca_pem), bytes(crl_pem)
        self._trusted: dict[bytes, tuple[str, ec.EllipticCurvePublicKey]] = {}  # certificate digest -> its check

    def _public_key(self, certificate: bytes) -> tuple[str, ec.EllipticCurvePublicKey]:
        digest = hashlib.sha256(certificate).digest()
        if digest not in self._trusted:
            try:
                device = verify_device_certificate(certificate, self._ca_pem, self._crl_pem)
            except IdentityError as err:
                raise PeerAuthenticationError(str(err)) from err
            key = x509.load_pem_x509_certificate(certificate).public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise PeerAuthenticationError("device certificates must carry an elliptic-curve key")
            self._trusted[digest] = (device, key)
        return self._trusted[digest]

    def verify(self, device: str, certificate: bytes, payload: bytes, signature: bytes) -> None:
        """Returns when genuine; ``PeerAuthenticationError`` saying why not otherwise."""
        if not isinstance(certificate, bytes) or not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES:
            raise PeerAuthenticationError(f"{device}: no certificate")
        if not isinstance(signature, bytes) or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
            raise PeerAuthenticationError(f"{device}: no signature")
        named, key = self._public_key(certificate)
        if named != device:
            raise PeerAuthenticationError(f"a certificate of {named!r} presented for {device!r}")
        try:
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as err:
            raise PeerAuthenticationError(f"the signature does not match {device}'s certificate") from err
