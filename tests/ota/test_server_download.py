"""The OTA HTTP server's Range support and the resumable, verified download."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import urllib3

from ota.download import DownloadError, download
from ota.server import RepositoryServer


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata/timestamp.json").write_text("{}")
    data = os.urandom(3_000_000)
    (root / "blob.bin").write_bytes(data)
    (root / ".staging").mkdir()
    (root / ".staging/secret").write_text("x")
    (tmp_path / "outside.txt").write_text("outside")
    return root, data


def test_ranges_are_served_exactly_and_nothing_outside_the_folder(served):
    root, data = served
    http = urllib3.PoolManager()
    with RepositoryServer(root) as server:
        url = f"{server.url}/blob.bin"
        assert http.request("GET", url).data == data
        head = http.request("HEAD", url)
        assert head.headers["Content-Length"] == str(len(data)) and head.headers["Accept-Ranges"] == "bytes"
        for header, expected in [("bytes=10-19", data[10:20]), ("bytes=2999990-", data[-10:]), ("bytes=-5", data[-5:])]:
            response = http.request("GET", url, headers={"Range": header})
            assert response.status == 206 and response.data == expected
        assert http.request("GET", url, headers={"Range": "bytes=3000000-"}).status == 416
        assert http.request("GET", url, headers={"Range": "bytes=5-2"}).status == 416
        assert "no-cache" in http.request("GET", f"{server.url}/metadata/timestamp.json").headers["Cache-Control"]
        for path in ["/../outside.txt", "/%2e%2e/outside.txt", "/.staging/secret", "/missing"]:
            assert http.request("GET", server.url + path).status == 404


def test_a_download_is_verified_and_a_wrong_file_never_takes_its_name(served, tmp_path):
    root, data = served
    sha = hashlib.sha256(data).hexdigest()
    with RepositoryServer(root) as server:
        dest = download(f"{server.url}/blob.bin", tmp_path / "got.bin", len(data), sha)
        assert dest.read_bytes() == data
        sent = server.stats["bytes_sent"]
        download(f"{server.url}/blob.bin", dest, len(data), sha)  # already there and verified
        assert server.stats["bytes_sent"] == sent
        with pytest.raises(DownloadError, match="does not match its signed sha256"):
            download(f"{server.url}/blob.bin", tmp_path / "bad.bin", len(data), "0" * 64)
        with pytest.raises(DownloadError, match="endless data"):
            download(f"{server.url}/blob.bin", tmp_path / "long.bin", 1000, sha)
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(f"{server.url}/nope.bin", tmp_path / "nope.bin", 10, sha)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()
    assert not (tmp_path / "long.bin").exists()


CHILD = """
import sys
from ota.download import download
download(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], chunk=int(sys.argv[5]))
"""


def test_a_killed_download_resumes_fetching_at_most_one_chunk_again(served, tmp_path):
    root, data = served
    sha, chunk = hashlib.sha256(data).hexdigest(), 128 * 1024
    dest = tmp_path / "resumed.bin"
    part = tmp_path / "resumed.bin.part"
    with RepositoryServer(root, max_bytes_per_s=2_000_000) as server:
        url = f"{server.url}/blob.bin"
        child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(dest), str(len(data)), sha, str(chunk)])
        deadline = time.monotonic() + 30
        while (not part.exists() or part.stat().st_size < 1_000_000) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        kept = part.stat().st_size
        assert 0 < kept < len(data)
        time.sleep(0.3)  # let the server notice the closed connection
        sent_before = server.stats["bytes_sent"]
        download(url, dest, len(data), sha, chunk=chunk)
        assert dest.read_bytes() == data and not part.exists()
        # the resumed request asked only for what the partial file lacked
        assert server.stats["bytes_sent"] - sent_before == len(data) - kept
        # and what the killed process had received but not yet written was at most about a chunk
        assert sent_before - kept <= chunk + 64 * 1024
