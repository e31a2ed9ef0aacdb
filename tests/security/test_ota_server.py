"""Attacks on the OTA HTTP server: idle connections that hold it open, paths that make it fail."""

import socket
import time

import pytest
import urllib3

from ota.server import RepositoryServer


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_text("{}")
    (root / "blob.bin").write_bytes(b"x" * 100_000)
    return root


@pytest.fixture(scope="module")
def server(repo_folder):
    with RepositoryServer(repo_folder) as running:
        yield running


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_idle_connections_are_closed_and_downloads_still_work(repo_folder):
    with RepositoryServer(repo_folder, idle_timeout_s=1.0) as server:
        host, port = server.httpd.server_address[:2]
        idle = [socket.create_connection((host, port)) for _ in range(200)]
        try:
            half_sent = idle[0]
            half_sent.sendall(b"GET /blob.bin HTTP/1.1\r\nHost: x\r\n")  # a slow-loris header, never finished
            response = urllib3.PoolManager().request("GET", f"{server.url}/blob.bin", timeout=5.0)
            assert response.status == 200 and len(response.data) == 100_000
            deadline = time.monotonic() + 6.0
            for sock in idle:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert all(_closed_by_server(sock) for sock in idle)
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/metadata/timestamp.json%00", 400),
        ("/metadata/%00/x", 400),
        ("/blob.bin%zz", 400),
        ("/blob%2", 400),
        ("/metadata/%ff%fe.json", 400),
        ("/" + "a" * 5000, 400),
        ("/metadata/timestamp.json\\..\\..", 404),
        ("/missing.json", 404),
    ],
)
def test_bad_paths_are_answered_and_never_raise(server, path, status):
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].split()[1] == str(status).encode(), answer[:200]
    assert server.errors == []  # no handler raised
    assert urllib3.PoolManager().request("GET", f"{server.url}/blob.bin").status == 200  # and it still serves


def test_https_checks_the_server_and_a_stalled_handshake_blocks_nobody(tmp_path, repo_folder):
    from ota.download import DownloadError, download
    from ota.tls import ServiceCA, TlsFiles

    ca = ServiceCA.create(tmp_path / "service_ca", "fleet")
    server_id = ca.issue_server("ota-server", ["127.0.0.1"], tmp_path / "tls")
    device = ca.issue_client("robot-1", tmp_path / "tls")
    stranger = ServiceCA.create(tmp_path / "other_ca", "someone else")
    files = TlsFiles(ca.cert_file, server_id.cert_file, server_id.key_file)
    tls = files.server_context(require_client_cert=True)
    with RepositoryServer(repo_folder, tls=tls, idle_timeout_s=1.0) as server:
        assert server.url.startswith("https://")
        host, port = server.httpd.server_address[:2]
        stalled = socket.create_connection((host, port))  # connects, never says hello
        trusted = urllib3.PoolManager(
            ssl_context=TlsFiles(ca.cert_file, device.cert_file, device.key_file).client_context()
        )
        got = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", 100_000, _sha(b"x" * 100_000), http=trusted)
        assert got.read_bytes() == b"x" * 100_000
        fooled = urllib3.PoolManager(ssl_context=TlsFiles(stranger.cert_file).client_context(), retries=False)
        with pytest.raises(DownloadError):  # a server this device's CA did not certify
            download(f"{server.url}/blob.bin", tmp_path / "b2", 100_000, _sha(b"x" * 100_000), http=fooled)
        anonymous = urllib3.PoolManager(ssl_context=TlsFiles(ca.cert_file).client_context(), retries=False)
        with pytest.raises(DownloadError):  # the server asks for a client certificate
            download(f"{server.url}/blob.bin", tmp_path / "b3", 100_000, _sha(b"x" * 100_000), http=anonymous)
        stalled.settimeout(5)
        assert _closed_by_server(stalled)
        stalled.close()
        assert server.errors == []


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
