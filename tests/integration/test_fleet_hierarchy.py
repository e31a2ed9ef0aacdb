"""The hierarchy as a real FLARE deployment on localhost: ``fleetnest provision`` (server, relay
with mutual TLS, a cluster-tier client, two leaves), every process started from its startup kit,
FLARE's routing proxy, seven device processes, ``jobs/nested_fleet`` submitted through the admin
API (Flare API). The tests run in order on one deployment:

1. three accepted versions (every leaf sum signed by its leaf and checked by the cluster); the
   leaves held only masked vectors; no fast-layer value left a device;
2. a leaf is killed: the job goes on with the other leaf and completes; the leaf rejoins for a
   second job;
3. during the second job a device's certificate is rotated and it keeps contributing; a revoked
   device, garbage, an expired and a foreign certificate are refused with a log line; every FLARE
   listener and the routing proxy speak verified TLS; a poll token replayed through the proxy is
   refused;
4. the server is killed mid-job and restarted: the job submitted again (in synchronous mode)
   resumes from the last accepted version;
and everything is shut down with no process or port left behind.

The waits are bounds on progress, not speed targets: ``make test`` runs three test files at a time
on two cores, so the deployment may have less than one core.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest

from app_custom.device_identity import sign_message
from app_custom.edge_messages import answer_payload, result_body
from edge_runtime.edge_api import EdgeApi, Status
from edge_runtime.fleet_device import DeviceIdentity, PollTokens
from provisioning.identities import DeviceCA
from simulator.localhost_fleet import (
    REPO,
    LocalFleet,
    devices_by_leaf,
    environment,
    port_in_use,
    processes_under,
    wait_until,
)

pytestmark = pytest.mark.integration

DEVICE_MESSAGES = {"KeyAdvert", "ShareBundle", "MaskedInput", "ConsistencySignature", "UnmaskShares"}
JOB = ("--buffer-timeout", "5", "--max-wait", "120", "--stage-timeout", "8")


class State:
    """What the ordered tests share."""

    fleet: LocalFleet
    by_leaf: dict[str, list[str]]
    survivor: str
    victim: str
    job_id: str | None = None  # the job the deployment runs now (a test run alone submits its own)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    fleet = LocalFleet.provision(base)
    s = State()
    s.fleet = fleet
    leaves = fleet.leaves
    lcp = json.loads((fleet.provisioned.kits / "scripts" / "lcp_map.json").read_text())
    assert list(lcp) == leaves
    s.by_leaf = devices_by_leaf(leaves, 4)
    s.survivor, s.victim = leaves
    s.by_leaf[s.victim] = s.by_leaf[s.victim][:3]  # 4 devices on the surviving leaf, 3 on the other
    try:
        fleet.start_all()
        fleet.wait_for_clients(3, timeout=300)
        fleet.start_proxy()
        config = base / "device_job.json"
        out = subprocess.run(
            [sys.executable, str(REPO / "jobs/nested_fleet/job.py"), "--print-device-config"],
            capture_output=True,
            text=True,
            env=environment(),
            check=True,
        )
        config.write_text(out.stdout)
        index = 0
        for devices in s.by_leaf.values():
            for device in devices:
                identity = base / "devices" / device / "identity"
                assert fleet.cli("device", "--id", device, "--out", str(identity)) == 0
                fleet.start_device(device, index, config, identity)
                index += 1
        yield s
    finally:
        ports = dict(fleet.ports)
        fleet.stop_all()
        leftover = [name for name, port in ports.items() if port_in_use(port)]
        assert not leftover, f"ports still in use after shutdown: {leftover}"
        assert not processes_under(base), processes_under(base)


def _job_status(fleet: LocalFleet, job_id: str) -> str:
    session = fleet.session()
    try:
        return str(session.get_job_meta(job_id).get("status"))
    finally:
        session.close()


def _leaf_audit(fleet: LocalFleet, leaf: str) -> list[dict]:
    path = fleet.kit(leaf) / "leaf_audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _device_audit(fleet: LocalFleet, device: str) -> list[dict]:
    path = fleet.base / "devices" / device / "state" / "outbound_audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


FIRST_JOB = ("--versions", "7", "--max-rounds", "12", *JOB)
SECOND_JOB = ("--versions", "30", "--max-rounds", "60", *JOB)


def _running_job(state: State, job: tuple[str, ...]) -> str:
    """The job the deployment runs: the one an earlier test left running, or, for a test run on its
    own, ``job`` submitted now and seen to make a version (its devices then have their tasks)."""
    fleet = state.fleet
    if state.job_id is not None and "RUNNING" in _job_status(fleet, state.job_id):
        return state.job_id
    accepted = len(fleet.accepted())
    state.job_id = fleet.submit(*job)
    wait_until(lambda: len(fleet.accepted()) > accepted, 375, f"a version of job {state.job_id}", interval=2)
    return state.job_id


def test_devices_train_through_their_leaves_and_the_cluster_accepts_three_versions(state):
    fleet = state.fleet
    state.job_id = fleet.submit(*FIRST_JOB)
    wait_until(lambda: len(fleet.accepted()) >= 3, 375, "three accepted global versions", interval=2)
    # a leaf of four fills its cohorts of three first come: a slow starter may not have had its turn
    # within three versions yet (seen once on a loaded machine), so wait for every device's first answer
    everyone = [device for devices in state.by_leaf.values() for device in devices]
    wait_until(lambda: all(_device_audit(fleet, d) for d in everyone), 150, "every device's first answer", interval=2)
    for version in fleet.accepted():
        assert version["num_devices"] >= 2 and version["parent"] is not None
    # the leaves held only secure-aggregation messages: masked vectors of 12-bit ring elements
    for leaf in fleet.leaves:
        records = _leaf_audit(fleet, leaf)
        assert records, f"{leaf} accepted no device message"
        # authenticated sessions: every device signed the survivor set it was shown
        assert {r["secagg"]["type"] for r in records if "secagg" in r} == DEVICE_MESSAGES
        masked = [r["secagg"] for r in records if r.get("secagg", {}).get("type") == "MaskedInput"]
        assert masked and all(m["ring_bits"] == 12 for m in masked)
        assert all(m["payload_bytes"] == (m["length"] * 12 + 7) // 8 for m in masked)
    # what left each device: protocol messages and its privacy spending, nothing else
    for devices in state.by_leaf.values():
        for device in devices:
            records = _device_audit(fleet, device)
            assert records, f"{device} sent nothing"
            assert all(r["secagg"]["type"] in DEVICE_MESSAGES for r in records if "secagg" in r)
            assert {name for r in records for name in r["metrics"]} <= {"dp_epsilon"}
    # every sum the cluster took was signed by its leaf: none was refused for its signature
    server = fleet.log("server")
    assert "leaf sums must be signed by their leaf under" in server
    assert not re.search(r"refused a leaf sum .*(signature|signed by)", server)
    # the job log names the mechanism and the accounting the devices' epsilon stands for
    assert "privacy: distributed discrete Gaussian" in server and "no amplification by sampling" in server


def _edge_api(fleet: LocalFleet, device: str) -> tuple[EdgeApi, str]:
    api = EdgeApi(fleet.proxy_url, device, fleet.proxy_ca)
    reply = wait_until(
        lambda: (r := api.get_job("nested_fleet", {"methods": ["fleetnest"]})).get("job_id") and r,
        30,
        f"a job for {device}",
    )
    return api, reply["job_id"]


def _send(fleet: LocalFleet, device: str, result: dict) -> dict:
    api, job_id = _edge_api(fleet, device)
    return api.report_result(job_id, "task", "train", result)


def _refusals(fleet: LocalFleet, leaf: str, device: str) -> list[str]:
    return re.findall(rf"refused (?:a result|a task request) from device '{re.escape(device)}': (.*)", fleet.log(leaf))


def test_a_killed_leaf_does_not_stop_the_job(state):
    fleet = state.fleet
    job_id = _running_job(state, FIRST_JOB)
    fleet.kill(state.victim)
    killed_at = time.time()
    wait_until(
        lambda: sum(v["created_at"] > killed_at for v in fleet.accepted()) >= 1,
        300,
        "an accepted version after the leaf was killed",
        interval=2,
    )
    wait_until(lambda: "FINISHED" in _job_status(fleet, job_id), 375, "the job to complete", interval=3)
    assert "COMPLETED" in _job_status(fleet, job_id)
    fleet.start_site(state.victim, "client")  # the killed leaf rejoins
    fleet.wait_for_clients(3, timeout=300)
    state.job_id = fleet.submit(*SECOND_JOB)
    accepted = len(fleet.accepted())
    wait_until(lambda: len(fleet.accepted()) > accepted, 300, "a version of the second job", interval=2)


def test_a_rotated_device_keeps_contributing_and_revoked_or_bad_ones_are_refused(state, tmp_path):
    # during the second job, with both leaves up
    fleet = state.fleet
    _running_job(state, SECOND_JOB)
    rotated, revoked = state.by_leaf[state.survivor][:2]
    identity = fleet.base / "devices" / rotated / "identity"
    before = (identity / "device.crt").read_bytes()
    sent_before = len(_device_audit(fleet, rotated))
    assert fleet.cli("rotate", "--device", rotated, "--out", str(identity), "--revoke-previous") == 0
    assert (identity / "device.crt").read_bytes() != before
    assert fleet.cli("revoke", "--device", revoked) == 0

    # garbage, a certificate of another CA, an expired certificate: each refused, the leaf goes on
    strangers = [d for d in devices_by_leaf(fleet.leaves, 8)[state.survivor] if d not in state.by_leaf[state.survivor]]
    garbage, foreign, expired = strangers[:3]
    assert _send(fleet, garbage, {"envelope": "bm90IGFuIGVudmVsb3Bl"})["status"] == Status.INVALID_REQUEST
    other_ca = DeviceCA.create(tmp_path / "other_ca", "another-fleet")
    stranger = other_ca.issue(foreign, 7)
    payload = answer_payload(foreign, "train", {}, b"x", {})
    reply = _send(fleet, foreign, result_body(sign_message(payload, stranger.key_pem, stranger.cert_pem)))
    assert reply["status"] == Status.INVALID_REQUEST
    ca = DeviceCA(fleet.provisioned.device_ca)
    old = ca.issue(expired, 1, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    payload = answer_payload(expired, "train", {}, b"x", {})
    reply = _send(fleet, expired, result_body(sign_message(payload, old.key_pem, old.cert_pem)))
    assert reply["status"] == Status.INVALID_REQUEST

    leaf = state.survivor
    assert any("malformed signed envelope" in r for r in _refusals(fleet, leaf, garbage))
    assert any("not issued by this fleet's device CA" in r for r in _refusals(fleet, leaf, foreign))
    assert any("is valid" in r and "not at" in r for r in _refusals(fleet, leaf, expired))

    def rotated_device_contributed() -> bool:
        sent = _device_audit(fleet, rotated)[sent_before:]
        return any(r.get("secagg", {}).get("type") == "MaskedInput" and r["status"] == "OK" for r in sent)

    wait_until(rotated_device_contributed, 225, f"{rotated} to send a masked vector with its new certificate")
    wait_until(lambda: any("has been revoked" in r for r in _refusals(fleet, leaf, revoked)), 225, f"{revoked} refused")


def test_every_flare_listener_and_the_routing_proxy_speak_tls(state):
    fleet = state.fleet
    root_ca = fleet.kit("server") / "startup" / "rootCA.pem"
    admin = fleet.admin_kit / "startup"  # mutual TLS listeners ask for a certificate of the project
    client = (admin / "client.crt", admin / "client.key")
    listeners = {"server": fleet.ports["server"], "admin": fleet.ports["admin"], "relay": fleet.ports["relay"]}
    listeners |= {leaf: fleet.ports[f"leaf{i}"] for i, leaf in enumerate(fleet.leaves, 1)}  # edge API services
    for name, port in listeners.items():
        _handshake(port, root_ca, name, client)
    _handshake(fleet.ports["proxy"], fleet.proxy_ca, "proxy")


def _handshake(port: int, cafile, name: str, client: tuple | None = None) -> None:
    """A TLS handshake that verifies the listener's certificate for localhost under ``cafile``."""
    context = ssl.create_default_context(cafile=str(cafile))
    if client is not None:
        context.load_cert_chain(*map(str, client))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3"), name
        except ssl.SSLError as err:
            raise AssertionError(f"{name} (port {port}) does not speak verified TLS: {err}") from err


def test_a_poll_token_replayed_through_the_proxy_is_refused(state, tmp_path):
    fleet = state.fleet
    _running_job(state, SECOND_JOB)
    device = devices_by_leaf(fleet.leaves, 12)[state.survivor][-1]  # none of the fleet's, nor a stranger before
    identity = tmp_path / device
    assert fleet.cli("device", "--id", device, "--out", str(identity)) == 0
    api, job_id = _edge_api(fleet, device)
    tokens = PollTokens(device, DeviceIdentity(identity))
    first = api.get_task(job_id, tokens.cookie(job_id))  # no token yet: a challenge
    tokens.take(first.get("cookie"))
    cookie = tokens.cookie(job_id)
    assert cookie, first
    captured = copy.deepcopy(cookie)
    admitted = api.get_task(job_id, cookie)
    assert not str(admitted.get("message") or "").startswith("not admitted"), admitted
    replayed = api.get_task(job_id, captured)
    assert str(replayed.get("message") or "").startswith("not admitted"), replayed
    wait_until(
        lambda: any("already used" in r for r in _refusals(fleet, state.survivor, device)),
        30,
        f"the leaf to log the replay of {device}'s token",
    )


def test_a_restarted_server_resumes_from_the_last_accepted_version(state):
    fleet = state.fleet
    _running_job(state, SECOND_JOB)
    fleet.kill("server")  # mid-job: the second job is still running
    restarted_at = time.time()
    last = json.loads((fleet.archive / "current.json").read_text())["version"]
    fleet.start_site("server", "server")
    fleet.wait_for_clients(3, timeout=300)
    job = fleet.submit("--versions", "1", "--mode", "sync", *JOB)  # the synchronous mode, on the same archive
    job_log = fleet.kit("server") / job / "log.txt"
    found = wait_until(
        lambda: job_log.exists() and re.search(r"resumed from global version (\d+)", job_log.read_text()),
        300,
        "the resubmitted job to resume",
    )
    assert int(found.group(1)) == last
    wait_until(
        lambda: any(v["parent"] == last and v["created_at"] > restarted_at for v in fleet.versions()),
        300,
        f"a version made from version {last} after the restart",
    )
