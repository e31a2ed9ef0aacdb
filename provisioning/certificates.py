"""The fleet's certificate authorities share one way to be made and to issue (``cryptography``).

``create_ca`` makes a self-signed P-256 CA in a folder (``ca.key`` owner-only, ``ca.pem``, the
folder owner-only); ``sign_certificate`` issues an end-entity certificate under it for one
purpose (client or server authentication), never past the CA's own expiry; ``host_names`` turns
DNS names and IP addresses into subject alternative names. The device CA
(``provisioning.identities``) and the service CA (``ota.tls``) are both made this way.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app_custom.durable import write_bytes_atomic

CA_VALID_DAYS = 3650
BACKDATE = dt.timedelta(minutes=5)  # a device whose clock runs a little behind still accepts a new certificate
# digital signature only: what a TLS server key does with ECDHE
SERVER_KEY_USAGE = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, private = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private, serialization.NoEncryption())


def create_ca(
    directory: Path, common_name: str, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA written to ``directory`` (which must not hold one already)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_bytes_atomic(directory / "ca.key", private_pem(key), 0o600)
    write_bytes_atomic(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """Subject alternative names for DNS names and IP addresses."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def sign_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    purpose: x509.ObjectIdentifier,
    now: dt.datetime,
    valid_days: int,
    alt_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """An end-entity certificate for ``purpose`` (``ExtendedKeyUsageOID.CLIENT_AUTH`` or
    ``SERVER_AUTH``), valid ``valid_days`` but never past the CA itself."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if purpose == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(SERVER_KEY_USAGE, critical=True)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())
