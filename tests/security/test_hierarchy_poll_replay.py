"""Attack 7: a captured poll token replayed, at the leaf it was made for and at another leaf.

The attacker has read one honest device's task request off the wire (a logging routing proxy, a
leaf's edge port, which anyone who reaches it may call) and sends it again, unchanged, as often
as it likes and to every leaf of the job. A poll earns a place in a cohort and, later, the global
slow layers: neither may go to a replayed token. The defence holds when every replay is refused
with a logged reason while the device's own polls go on being admitted.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace
from nvflare.edge.constants import EdgeApiStatus
from nvflare.edge.executors.hug import TaskInfo
from nvflare.edge.web.models.device_info import DeviceInfo
from nvflare.edge.web.models.task_request import TaskRequest
from nvflare.edge.web.models.user_info import UserInfo

from app_custom.flare.fleet_executor import NestedFleetExecutor
from app_custom.flare.fleet_messages import version_message
from edge_runtime.fleet_device import DeviceIdentity, PollTokens
from jobs.nested_fleet.job import settings as job_settings
from provisioning.identities import DeviceCA

JOB_ID = "job-7"
WEIGHTS = {"trunk.w": np.zeros((4, 3), np.float32), "trunk.b": np.zeros(3, np.float32)}


def site_kit(startup: Path, site: str) -> None:
    """A FLARE site's ``client.key`` and ``client.crt`` in ``startup`` (under a throwaway root: the
    leaf needs a site key to sign its sums; tests of those use a real ``nvflare provision``)."""
    now = dt.datetime.now(dt.timezone.utc)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "project root")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(root_key, hashes.SHA256())
    )
    startup.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (startup / "client.crt").write_bytes(cert.public_bytes(pem))
    (startup / "client.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


class LeafSite:
    """One leaf as FLARE runs it: ``NestedFleetExecutor`` with its updater made from a real
    ``FLContext`` (site name, job, workspace with the fleet's device CA), holding a task with the
    global slow layers. ``poll`` and ``report`` are what its edge API service hands the executor."""

    def __init__(self, root: Path, name: str, device_ca: Path, cohort_size: int = 3, **executor) -> None:
        (root / "local" / "device_ca").mkdir(parents=True)
        for file in ("ca.pem", "crl.pem"):
            shutil.copyfile(device_ca / file, root / "local" / "device_ca" / file)
        site_kit(root / "startup", name)
        self.name = name
        args = job_settings(type("Args", (), {"devices": 8, "cohort": cohort_size, "noise": 0.0})())
        self.executor = NestedFleetExecutor(
            privacy=args["privacy"], cohort_size=cohort_size, min_devices=2, enrol_timeout=600, **executor
        )
        self.fl_ctx = FLContext()
        self.fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=True)
        self.fl_ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=False, sticky=True)
        self.fl_ctx.set_prop(ReservedKey.IS_LEAF, True, private=False, sticky=True)
        self.fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(root), name), private=True, sticky=True)
        self.updater = self.executor.get_updater(self.fl_ctx)
        assert self.updater is not None
        self.updater.start_task(version_message(0, WEIGHTS), self.fl_ctx)
        task = Shareable()
        task.set_header(ReservedKey.TASK_ID, f"task-{name}")
        self.task = TaskInfo(task)

    def poll(self, request: TaskRequest) -> dict:
        return dict(self.executor.process_edge_task_request(request, self.task, self.fl_ctx))

    def report(self, report) -> dict:
        return dict(self.executor.process_edge_result_report(report, self.task, self.fl_ctx))

    @property
    def cohort(self) -> list[str]:
        session = self.updater.session
        return list(session.cohort) if session is not None else []


class HonestDevice:
    """A device's task polls as ``edge_runtime.fleet_device.FleetClient`` makes them (its
    ``PollTokens``), each answer's cookie taken back; ``sent`` is what went on the wire."""

    def __init__(self, device: str, identity: Path) -> None:
        self.id = device
        self.info, self.user = DeviceInfo(device, app_name="fleetnest", platform="linux"), UserInfo()
        self.tokens = PollTokens(device, DeviceIdentity(identity))
        self.sent: list[TaskRequest] = []

    def poll(self, leaf: LeafSite) -> dict:
        request = TaskRequest(self.info, self.user, JOB_ID, self.tokens.cookie(JOB_ID))
        self.sent.append(copy.deepcopy(request))
        reply = leaf.poll(request)
        self.tokens.take(reply.get("cookie"))
        return reply


def admitted(reply: dict) -> bool:
    return not str(reply.get("message") or "").startswith("not admitted")


@pytest.fixture
def fleet(tmp_path):
    return make_fleet(tmp_path)


def make_fleet(tmp_path: Path) -> tuple[DeviceCA, dict[str, LeafSite], dict[str, HonestDevice]]:
    """A device CA, two leaves of one job and the identities of robot-1 .. robot-4."""
    ca = DeviceCA.create(tmp_path / "device_ca", "fleetnest-test")
    leaves = {name: LeafSite(tmp_path / name, name, ca.dir) for name in ("eu-depot-1", "eu-depot-2")}
    devices = {}
    for n in range(1, 5):
        identity = tmp_path / "devices" / f"robot-{n}"
        issued = ca.issue(f"robot-{n}", 7)
        identity.mkdir(parents=True)
        (identity / "device.key").write_bytes(issued.key_pem)
        (identity / "device.crt").write_bytes(issued.cert_pem)
        (identity / "device_ca.pem").write_bytes((ca.dir / "ca.pem").read_bytes())
        devices[f"robot-{n}"] = HonestDevice(f"robot-{n}", identity)
    return ca, leaves, devices


def _enrol(device: HonestDevice, leaf: LeafSite) -> TaskRequest:
    """The device polls ``leaf`` until it holds a place in its cohort; the request that won it."""
    for _ in range(3):
        reply = device.poll(leaf)
        if device.id in leaf.cohort:
            return device.sent[-1]
        assert reply["status"] == EdgeApiStatus.RETRY
    raise AssertionError(f"{device.id} was not enrolled at {leaf.name}: {reply}")


def test_a_captured_poll_token_buys_nothing_at_another_leaf_of_the_job(fleet, caplog):
    _, leaves, devices = fleet
    home, other = leaves["eu-depot-1"], leaves["eu-depot-2"]
    captured = copy.deepcopy(_enrol(devices["robot-1"], home))  # read off the wire at robot-1's leaf
    caplog.set_level(logging.WARNING)
    reply = other.poll(copy.deepcopy(captured))
    assert "robot-1" not in other.cohort, "a replayed token bought robot-1's identity a place at another leaf"
    assert not admitted(reply)
    assert any("robot-1" in r.getMessage() and "eu-depot-1" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_a_captured_poll_token_is_refused_at_its_own_leaf_when_sent_again(fleet, caplog):
    _, leaves, devices = fleet
    home = leaves["eu-depot-1"]
    captured = _enrol(devices["robot-1"], home)
    _enrol(devices["robot-2"], home)
    _enrol(devices["robot-3"], home)  # the cohort is full: the session hands out the train step
    assert home.updater.session.stage == "train"
    caplog.set_level(logging.WARNING)
    for _ in range(5):
        reply = home.poll(copy.deepcopy(captured))
        assert not admitted(reply), "a replayed token got robot-1's train step (the global slow layers)"
        assert reply.get("task_data") is None
    assert any("already used" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    # the device itself goes on: its own next poll gets its train step
    reply = devices["robot-1"].poll(home)
    assert reply["status"] == EdgeApiStatus.OK and reply["task_data"]["stage"] == "train"


def test_a_challenge_is_good_once_for_its_device_and_leaf_within_its_window_and_memory_is_bounded():
    """The leaf's side alone (``PollChallenges``, its own clock): a captured token is refused once
    used, later than the window, for another device, leaf or job, and with a forged challenge; a
    leaf remembers used challenges only for the window, and at most ``capacity`` of them."""
    from app_custom.edge_messages import ChallengeError, EdgeMessageError, PollChallenges

    now = [100.0]
    leaf = PollChallenges(JOB_ID, "eu-depot-1", window=60, capacity=3, clock=lambda: now[0])

    def token(device="robot-1", **change):
        cookie = leaf.issue(device)
        return {"device": device, "job_id": JOB_ID, "leaf": cookie["leaf"], "challenge": cookie["challenge"]} | change

    good = token()
    leaf.spend(leaf.check(good, "robot-1"))
    with pytest.raises(ChallengeError, match="already used"):
        leaf.check(good, "robot-1")
    late = token()
    now[0] += 61
    with pytest.raises(ChallengeError, match="old"):
        leaf.check(late, "robot-1")
    with pytest.raises(ChallengeError, match="did not issue to 'robot-2'"):
        leaf.check(token() | {"device": "robot-2"}, "robot-2")  # robot-1's challenge signed by robot-2
    with pytest.raises(EdgeMessageError, match="sent as"):
        leaf.check(token(), "robot-2")
    with pytest.raises(ChallengeError, match="for leaf 'eu-depot-2'"):
        leaf.check(token(leaf="eu-depot-2"), "robot-1")
    with pytest.raises(ChallengeError, match="for job"):
        leaf.check(token(job_id="another-job"), "robot-1")
    forged = token()
    forged["challenge"] = forged["challenge"][:-4] + ("AAA=" if not forged["challenge"].endswith("AAA=") else "BBB=")
    with pytest.raises((ChallengeError, EdgeMessageError)):
        leaf.check(forged, "robot-1")
    for _ in range(3):
        leaf.spend(leaf.check(token(), "robot-1"))
    with pytest.raises(ChallengeError, match="polls within"):
        leaf.spend(leaf.check(token(), "robot-1"))  # full: refused until some expire
    now[0] += 61
    leaf.spend(leaf.check(token(), "robot-1"))  # the expired ones were forgotten
