"""A leaf's check of signed device messages: genuine ones pass with their device id; forged,
tampered, foreign, revoked (without restarting the leaf) and expired ones are refused."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from app_custom.device_identity import DeviceAuthenticator, IdentityError, sign_message
from provisioning.identities import DeviceCA

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def ca(tmp_path):
    return DeviceCA.create(tmp_path / "device_ca", "fleetnest-test", now=NOW)


def test_a_signed_message_opens_with_its_device_id_and_a_tampered_one_does_not(ca):
    robot = ca.issue("robot-17", 30, now=NOW)
    leaf = DeviceAuthenticator(ca.dir)
    envelope = sign_message(b"masked vector", robot.key_pem, robot.cert_pem)
    assert leaf.open(envelope, NOW) == ("robot-17", b"masked vector")
    raw = json.loads(envelope)
    raw["payload"] = base64.b64encode(b"masked vectoR").decode()
    with pytest.raises(IdentityError, match="signature does not match robot-17"):
        leaf.open(json.dumps(raw).encode(), NOW)
    other = ca.issue("robot-18", 30, now=NOW)
    raw = json.loads(envelope) | {"cert": base64.b64encode(other.cert_pem).decode()}  # robot-17 posing as 18
    with pytest.raises(IdentityError, match="signature does not match robot-18"):
        leaf.open(json.dumps(raw).encode(), NOW)
    with pytest.raises(IdentityError, match="malformed signed envelope"):
        leaf.open(b"{not json", NOW)


def test_a_revocation_reaches_a_running_leaf_and_foreign_or_expired_certificates_are_refused(ca, tmp_path):
    robot = ca.issue("robot-17", 30, now=NOW)
    leaf = DeviceAuthenticator(ca.dir)
    envelope = sign_message(b"advert", robot.key_pem, robot.cert_pem)
    assert leaf.open(envelope, NOW)[0] == "robot-17"
    ca.revoke("robot-17", now=NOW + dt.timedelta(seconds=1))
    with pytest.raises(IdentityError, match="has been revoked"):
        leaf.open(envelope, NOW)
    stranger = DeviceCA.create(tmp_path / "elsewhere", "other-fleet", now=NOW).issue("robot-17", 30, now=NOW)
    with pytest.raises(IdentityError, match="not issued by this fleet's device CA"):
        leaf.open(sign_message(b"advert", stranger.key_pem, stranger.cert_pem), NOW)
    drone = ca.issue("drone-1", 1, now=NOW)
    with pytest.raises(IdentityError, match="not at"):
        leaf.open(sign_message(b"advert", drone.key_pem, drone.cert_pem), NOW + dt.timedelta(days=2))
