"""Device certificates under the fleet's device CA: issue, rotate, revoke, verify."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.identities import DeviceCA, IdentityError, verify_device_certificate

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def ca(tmp_path):
    return DeviceCA.create(tmp_path / "device_ca", "fleetnest-test", now=NOW)


def _verify(ca, cert_pem, now=NOW):
    return verify_device_certificate(cert_pem, (ca.dir / "ca.pem").read_bytes(), (ca.dir / "crl.pem").read_bytes(), now)


def test_an_issued_certificate_names_its_device_and_the_ca_key_is_owner_only(ca):
    identity = ca.issue("robot-17", 30, now=NOW)
    assert _verify(ca, identity.cert_pem) == "robot-17"
    assert stat.S_IMODE((ca.dir / "ca.key").stat().st_mode) == 0o600
    assert identity.not_after == NOW + dt.timedelta(days=30)


def test_a_csr_keeps_the_key_on_the_device_and_a_forged_csr_is_refused(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drone-3")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    identity = ca.issue("drone-3", 30, csr.public_bytes(serialization.Encoding.PEM), now=NOW)
    assert identity.key_pem is None
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    with pytest.raises(IdentityError, match="not 'drone-4'"):
        ca.issue("drone-4", 30, csr.public_bytes(serialization.Encoding.PEM), now=NOW)


def test_rotation_gives_a_new_certificate_and_the_old_one_stays_valid_until_revoked(ca):
    first = ca.issue("robot-17", 10, now=NOW)
    assert ca.due_for_renewal(7, now=NOW + dt.timedelta(days=4)) == ["robot-17"]
    second = ca.issue("robot-17", 10, now=NOW + dt.timedelta(days=4))
    assert ca.due_for_renewal(7, now=NOW + dt.timedelta(days=4)) == []
    later = NOW + dt.timedelta(days=5)
    assert _verify(ca, first.cert_pem, later) == _verify(ca, second.cert_pem, later) == "robot-17"
    third = ca.issue("robot-17", 10, now=later, revoke_previous=True)
    with pytest.raises(IdentityError, match="revoked"):
        _verify(ca, second.cert_pem, later)
    assert _verify(ca, third.cert_pem, later) == "robot-17"


def test_revoked_expired_foreign_and_stale_crl_are_each_refused_with_the_reason(ca, tmp_path):
    identity = ca.issue("robot-17", 10, now=NOW)
    with pytest.raises(IdentityError, match="revocation list expired"):
        _verify(ca, identity.cert_pem, NOW + dt.timedelta(days=8))
    ca.publish_crl(now=NOW + dt.timedelta(days=11))
    with pytest.raises(IdentityError, match="not at 2026-12-06"):
        _verify(ca, identity.cert_pem, NOW + dt.timedelta(days=11))
    ca.publish_crl(now=NOW)
    foreign = DeviceCA.create(tmp_path / "other", "someone-else", now=NOW).issue("robot-17", 10, now=NOW)
    with pytest.raises(IdentityError, match="not issued by this fleet's device CA"):
        _verify(ca, foreign.cert_pem)
    ca.revoke("robot-17", now=NOW)
    with pytest.raises(IdentityError, match="has been revoked"):
        _verify(ca, identity.cert_pem)
    with pytest.raises(IdentityError, match="no certificate issued"):
        ca.revoke("robot-99", now=NOW)
    with pytest.raises(IdentityError, match="not a PEM certificate"):
        _verify(ca, b"garbage")
    with pytest.raises(IdentityError, match="device id"):
        ca.issue("robot 17", 10, now=NOW)


def test_unreadable_ca_material_long_ids_and_other_curves_get_clear_errors(ca):
    identity = ca.issue("robot-17", 10, now=NOW)
    with pytest.raises(IdentityError, match="unreadable"):
        verify_device_certificate(identity.cert_pem, (ca.dir / "ca.pem").read_bytes(), b"garbage", NOW)
    with pytest.raises(IdentityError, match="timezone-aware"):
        _verify(ca, identity.cert_pem, NOW.replace(tzinfo=None))
    with pytest.raises(IdentityError, match="at most 64"):
        ca.issue("r" * 100, 10, now=NOW)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drone-9")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    with pytest.raises(IdentityError, match="P-256"):
        ca.issue("drone-9", 10, csr.public_bytes(serialization.Encoding.PEM), now=NOW)


def test_reopening_the_ca_refreshes_the_crl_so_leaves_keep_trusting_devices(ca):
    identity = ca.issue("robot-17", 30, now=NOW)
    later = NOW + dt.timedelta(days=10)
    with pytest.raises(IdentityError, match="revocation list expired"):
        _verify(ca, identity.cert_pem, later)
    DeviceCA.create(ca.dir, "fleetnest-test", now=later)  # what every provisioning run does
    assert _verify(ca, identity.cert_pem, later) == "robot-17"
