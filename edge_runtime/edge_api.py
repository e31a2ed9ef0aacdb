"""The device's client of FLARE's edge HTTP API: ``/job``, ``/task`` and ``/result`` through the
fleet's routing proxy, with ``requests``, so that a device needs no nvflare.

The wire is FLARE's own (``nvflare.edge.web.views.feg_views``, what its ``FegApi`` sends): every
call is a JSON POST; the device id rides in the ``X-Flare-Device-ID`` header and the rest of the
device's description in ``X-Flare-Device-Info`` (a query string); ``/task`` takes the job id as a
query parameter and the poll token as ``cookie`` in the body; ``/result`` takes the job and task
ids as query parameters and the status, task name, result and cookie in the body. Replies are JSON
objects with a ``status`` (``Status``). ``tests/edge_runtime/test_edge_api.py`` checks the requests
against ``FegApi``'s, and the hierarchy's integration test runs this client against a real proxy.

HTTPS only: the proxy's certificate must verify under the fleet's device CA (and its host name),
no proxy or CA bundle is taken from the environment, and every call has a timeout.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import requests

HTTP_TIMEOUT_S = 60.0
DEVICE_ID_HEADER, DEVICE_INFO_HEADER = "X-Flare-Device-ID", "X-Flare-Device-Info"


class Status:
    """The ``status`` of an edge API reply (FLARE's ``EdgeApiStatus``)."""

    OK = "OK"
    RETRY = "RETRY"
    DONE = "DONE"
    ERROR = "ERROR"
    NO_JOB = "NO_JOB"
    NO_TASK = "NO_TASK"
    INVALID_REQUEST = "INVALID_REQUEST"


class EdgeApiError(RuntimeError):
    """The proxy answered with an HTTP error, or not with a JSON object."""

    def __init__(self, url: str, status_code: int, detail: str) -> None:
        super().__init__(f"{url}: HTTP {status_code}: {detail}")
        self.status_code = status_code


class EdgeApi:
    """One device's calls to the routing proxy at ``proxy`` (an https URL), verified under ``ca_file``."""

    def __init__(
        self,
        proxy: str,
        device_id: str,
        ca_file: str | Path,
        app_name: str = "fleetnest",
        platform: str = "linux",
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> None:
        if urlsplit(proxy).scheme != "https":
            raise ValueError(
                f"the routing proxy must be reached over https, not {proxy!r}: in clear text its tokens,"
                " the global slow layers and the masked vectors are anyone's on the way"
            )
        if not Path(ca_file).is_file():
            raise ValueError(f"no CA certificate to verify the routing proxy with: {ca_file}")
        self.endpoint = proxy.rstrip("/") + "/"
        self.device_id = device_id
        self.timeout_s = timeout_s
        self.headers = {
            "Content-Type": "application/json",
            DEVICE_ID_HEADER: device_id,
            DEVICE_INFO_HEADER: urlencode({"app_name": app_name, "platform": platform}),
        }
        self.session = requests.Session()
        self.session.verify = str(ca_file)
        self.session.trust_env = False  # no proxy or CA bundle from the environment

    def get_job(self, job_name: str, capabilities: dict) -> dict:
        """Ask for the open job named ``job_name``: ``job_id`` in the reply when there is one."""
        return self._post("job", {}, {"job_name": job_name, "capabilities": capabilities})

    def get_task(self, job_id: str, cookie: dict | None = None) -> dict:
        """Poll ``job_id`` for a task: ``task_id``, ``task_name`` and ``task_data`` when there is one."""
        return self._post("task", {"job_id": job_id}, {"cookie": cookie} if cookie else {})

    def report_result(
        self, job_id: str, task_id: str, task_name: str, result: dict, cookie: dict | None = None, status: str = "OK"
    ) -> dict:
        """Answer task ``task_id`` of ``job_id`` with ``result``."""
        body = {"status": status, "task_name": task_name, "result": result}
        if cookie:
            body["cookie"] = cookie
        return self._post("result", {"job_id": job_id, "task_id": task_id}, body)

    def _post(self, path: str, params: dict, body: dict) -> dict:
        url = urljoin(self.endpoint, path)
        response = self.session.post(url, params=params, json=body, headers=self.headers, timeout=self.timeout_s)
        if response.status_code != 200:
            raise EdgeApiError(url, response.status_code, response.text[:200])
        try:
            reply = response.json()
        except ValueError as err:
            raise EdgeApiError(url, response.status_code, f"not JSON ({err})") from err
        if not isinstance(reply, dict):
            raise EdgeApiError(url, response.status_code, f"a JSON {type(reply).__name__}, not an object")
        return reply
