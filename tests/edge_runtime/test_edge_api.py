"""The device's own edge API client sends what FLARE's ``FegApi`` sends, and refuses what it must."""

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from edge_runtime.edge_api import EdgeApi, EdgeApiError
from ota.tls import ServiceCA


@pytest.fixture
def proxy(tmp_path):
    """An HTTPS server on localhost that records every request and answers ``reply``."""
    ca = ServiceCA.create(tmp_path / "ca", "fleetnest")
    server_id = ca.issue_server("proxy", ["localhost", "127.0.0.1"], tmp_path / "server")
    seen, reply = [], {"body": b'{"status": "OK", "job_id": "j1"}', "code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            url = urlsplit(self.path)
            seen.append(
                {
                    "path": url.path,
                    "params": dict(parse_qsl(url.query)),
                    "body": json.loads(self.rfile.read(length) or b"null"),
                    "device_id": self.headers.get("X-Flare-Device-ID"),
                    # FegApi also sends the fields it has no value for, as "None"
                    "device_info": {
                        k: v for k, v in parse_qsl(self.headers.get("X-Flare-Device-Info", "")) if v != "None"
                    },
                }
            )
            self.send_response(reply["code"])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply["body"])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_id.cert_file, server_id.key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://localhost:{server.server_address[1]}", ca.cert_file, seen, reply
    finally:
        server.shutdown()
        server.server_close()


def test_requests_match_flares_own_client(proxy, monkeypatch):
    from nvflare.edge.simulation.feg_api import FegApi
    from nvflare.edge.web.models.device_info import DeviceInfo
    from nvflare.edge.web.models.job_request import JobRequest
    from nvflare.edge.web.models.result_report import ResultReport
    from nvflare.edge.web.models.task_request import TaskRequest
    from nvflare.edge.web.models.user_info import UserInfo

    url, ca_file, seen, _ = proxy
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))  # FegApi verifies with requests' defaults
    info, user = DeviceInfo("robot-7", app_name="fleetnest", platform="linux"), UserInfo()
    flare = FegApi(url + "/", info, user)
    cookie, result = {"token": "abc"}, {"envelope": "eA=="}
    flare.get_job(JobRequest("nested_fleet", info, user, {"methods": ["fleetnest"]}))
    flare.get_task(TaskRequest(info, user, "j1", cookie))
    flare.report_result(ResultReport(info, user, "j1", "t9", "train", "OK", result))
    theirs = list(seen)
    seen.clear()

    ours = EdgeApi(url, "robot-7", ca_file)
    assert ours.get_job("nested_fleet", {"methods": ["fleetnest"]}) == {"status": "OK", "job_id": "j1"}
    ours.get_task("j1", cookie)
    ours.report_result("j1", "t9", "train", result)
    assert seen == theirs
    assert [r["path"] for r in seen] == ["/job", "/task", "/result"]
    assert seen[0]["device_info"] == {"app_name": "fleetnest", "platform": "linux"}


def test_refuses_clear_text_an_unverified_proxy_and_a_bad_reply(proxy, tmp_path):
    url, ca_file, _, reply = proxy
    with pytest.raises(ValueError, match="https"):
        EdgeApi(url.replace("https", "http"), "robot-7", ca_file)
    with pytest.raises(ValueError, match="no CA certificate"):
        EdgeApi(url, "robot-7", tmp_path / "missing.pem")
    other = ServiceCA.create(tmp_path / "other", "another-fleet")
    with pytest.raises(requests.exceptions.SSLError):
        EdgeApi(url, "robot-7", other.cert_file).get_job("nested_fleet", {})
    reply.update(code=500, body=b"boom")
    with pytest.raises(EdgeApiError, match="HTTP 500"):
        EdgeApi(url, "robot-7", ca_file).get_job("nested_fleet", {})
    reply.update(code=200, body=b"[1, 2]")
    with pytest.raises(EdgeApiError, match="not an object"):
        EdgeApi(url, "robot-7", ca_file).get_job("nested_fleet", {})
