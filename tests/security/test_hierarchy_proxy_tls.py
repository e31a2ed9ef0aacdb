"""Attack 7 (the channel): devices talk to FLARE's routing proxy, and it forwards to the leaves.

An eavesdropper between a robot and the proxy reads what a clear-HTTP proxy carries (tokens, the
global slow layers, masked vectors) and a man in the middle answers in the proxy's place. With
a real ``fleetnest provision`` and FLARE's real routing proxy as ``simulator.localhost_fleet``
starts it, the defence holds when the proxy speaks only TLS with a certificate that verifies
under the fleet's device CA for the proxy's host name, the device client refuses anything else,
and the proxy's key cannot pass as a device.
"""

from __future__ import annotations

import socket
import ssl
import stat
import time

import pytest
import requests

from app_custom.device_identity import IdentityError, verify_device_certificate
from provisioning.identities import DeviceCA
from simulator.localhost_fleet import LocalFleet, port_in_use


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    base = tmp_path_factory.mktemp("proxy")
    fleet = LocalFleet.provision(base, leaves=1)
    fleet.start_proxy()
    try:
        deadline = time.monotonic() + 30
        while not port_in_use(fleet.ports["proxy"]):
            assert time.monotonic() < deadline, fleet.log("proxy")
            time.sleep(0.2)
        yield fleet
    finally:
        fleet.stop_all()


def _handshake(port: int, cafile, host: str = "localhost") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cafile))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=host)


def test_the_routing_proxy_speaks_tls_under_the_device_ca(proxy):
    device_ca = proxy.provisioned.device_ca / "ca.pem"  # what every device holds as device_ca.pem
    with _handshake(proxy.ports["proxy"], device_ca) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", proxy.ports["proxy"]), timeout=10) as clear:
        clear.sendall(b"POST /task HTTP/1.1\r\nHost: x\r\nX-Flare-Device-ID: robot-1\r\nContent-Length: 2\r\n\r\n{}")
        clear.settimeout(5)
        try:
            answer = clear.recv(200)
        except (TimeoutError, ConnectionError):
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), f"the proxy answered in clear text: {answer!r}"


def test_a_device_reaches_the_proxy_only_over_verified_https(proxy, tmp_path):
    from edge_runtime.edge_api import EdgeApi, Status

    identity = tmp_path / "robot-1"
    assert proxy.cli("device", "--id", "robot-1", "--out", str(identity)) == 0
    capabilities = {"methods": ["fleetnest"]}
    # the device's own client, with the CA `fleetnest provision device` put beside its key
    reply = EdgeApi(proxy.proxy_url, "robot-1", identity / "device_ca.pem").get_job("nested_fleet", capabilities)
    assert reply["status"] in (Status.RETRY, Status.OK)  # no leaf runs here: the proxy says retry
    # a proxy whose certificate is not under the fleet's device CA (a man in the middle) is refused
    other_ca = DeviceCA.create(tmp_path / "other_ca", "another-fleet").dir / "ca.pem"
    with pytest.raises(requests.exceptions.SSLError):
        EdgeApi(proxy.proxy_url, "robot-1", other_ca).get_job("nested_fleet", capabilities)
    # so is a name the certificate does not carry
    with pytest.raises(requests.exceptions.SSLError):
        url = proxy.proxy_url.replace("127.0.0.1", "127.0.0.2")
        EdgeApi(url, "robot-1", identity / "device_ca.pem").get_job("nested_fleet", capabilities)
    # and clear HTTP, before anything is sent
    with pytest.raises(ValueError, match="must be reached over https"):
        EdgeApi(proxy.proxy_url.replace("https", "http"), "robot-1", identity / "device_ca.pem")


def test_the_proxy_key_is_owner_only_and_its_certificate_is_no_device_certificate(proxy):
    scripts = proxy.provisioned.kits / "scripts"
    assert stat.S_IMODE((scripts / "proxy.key").stat().st_mode) == 0o600
    ca_dir = proxy.provisioned.device_ca
    with pytest.raises(IdentityError, match="not a device certificate"):
        verify_device_certificate(
            (scripts / "proxy.crt").read_bytes(), (ca_dir / "ca.pem").read_bytes(), (ca_dir / "crl.pem").read_bytes()
        )
