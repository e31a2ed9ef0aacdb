"""The fleet's broker rules for amqtt (the in-process broker of the demo, where no Mosquitto runs):
the same identities and ACLs as ``ota.broker_config`` writes for Mosquitto.

amqtt checks a client certificate against the listener's CA at the TLS handshake but does not
require one (``CERT_OPTIONAL``), and has no certificate-to-user mapping or ``%u`` ACL patterns.
``CertificateAuth`` refuses a client without a certificate, takes a device certificate's common
name as the user name after checking it against the device CA and its CRL
(``app_custom.device_identity``), takes a service certificate's common name on the service CA, and
refuses a device whose client id or last-will topic is not its own. ``FleetTopicAcl`` then allows a
device to publish only ``<prefix>/{report,presence,health}/<itself>`` and to subscribe to and
receive ``<prefix>/desired/+``; a service gets the reads and writes ``BrokerConfig`` gives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin
from amqtt.session import Session
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from app_custom.device_identity import IdentityError, verify_device_certificate

log = logging.getLogger(__name__)
DEVICE, SERVICE = "device", "service"
ROLE = "fleetnest_role"  # the session attribute CertificateAuth sets: DEVICE or SERVICE


def _peer(session: Session) -> x509.Certificate | None:
    ssl_object = getattr(session, "ssl_object", None)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der) if der else None


def _issued_by(cert: x509.Certificate, ca_pem: bytes) -> bool:
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        return True
    except Exception:  # noqa: BLE001 - a wrong issuer, key type or signature: not issued by it
        return False


class CertificateAuth(BaseAuthPlugin):
    @dataclass
    class Config:
        device_ca: str
        device_crl: str
        service_ca: str
        prefix: str = "fleetnest"

    async def authenticate(self, *, session: Session) -> bool | None:
        cert = _peer(session)
        if cert is None:
            log.warning("refused %s: no client certificate", session.client_id)
            return False
        ca_pem = Path(self.config.device_ca).read_bytes()
        if _issued_by(cert, ca_pem):
            try:
                device = verify_device_certificate(
                    cert.public_bytes(serialization.Encoding.PEM), ca_pem, Path(self.config.device_crl).read_bytes()
                )
            except IdentityError as e:
                log.warning("refused %s: %s", session.client_id, e)
                return False
            if session.client_id not in (device, f"fleetnest-device-{device}"):
                log.warning("refused %s: client id is not its own (%s)", device, session.client_id)
                return False
            if session.will_flag and session.will_topic != f"{self.config.prefix}/presence/{device}":
                log.warning("refused %s: last will on %s", device, session.will_topic)
                return False
            session.username = device
            setattr(session, ROLE, DEVICE)
            return True
        if _issued_by(cert, Path(self.config.service_ca).read_bytes()):
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if len(names) != 1 or str(session.client_id).startswith("fleetnest-device-"):
                return False
            session.username = str(names[0].value)
            setattr(session, ROLE, SERVICE)
            return True
        log.warning("refused %s: certificate from neither the device CA nor the service CA", session.client_id)
        return False


class FleetTopicAcl(BaseTopicPlugin):
    @dataclass
    class Config:
        prefix: str = "fleetnest"
        services: dict[str, list[list[str]]] = field(default_factory=dict)  # name -> [reads, writes]

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None or session.username is None:
            return False
        role, user, p = getattr(session, ROLE, None), session.username, self.config.prefix
        if role == DEVICE:
            if action == Action.PUBLISH:
                return topic in {f"{p}/report/{user}", f"{p}/presence/{user}", f"{p}/health/{user}"}
            return TopicAccessControlListPlugin.topic_ac(topic, f"{p}/desired/+")
        if role == SERVICE and user in self.config.services:
            reads, writes = self.config.services[user]
            allowed = writes if action == Action.PUBLISH else reads
            return any(TopicAccessControlListPlugin.topic_ac(topic, pattern) for pattern in allowed)
        return False


def plugin_config(setup) -> dict:
    """amqtt's ``plugins`` section for a ``ota.brokers.FleetBrokerSetup``."""
    config, files = setup.config, setup.config.files
    services = {
        name: [reads, writes] for name, (reads, writes) in (config.services or config.default_services()).items()
    }
    return {
        f"{__name__}.CertificateAuth": {
            "device_ca": str(files.device_ca),
            "device_crl": str(files.device_crl),
            "service_ca": str(files.service_ca),
            "prefix": config.prefix,
        },
        f"{__name__}.FleetTopicAcl": {"prefix": config.prefix, "services": services},
    }
