"""Attack 6: ejecting a device from its leaf's session by naming it in a request that fails.

The routing proxy hands a leaf the device id a request *claims*; anyone who reaches the proxy (or
the leaf's edge port) can claim any id. The attacker sends results that fail the leaf's checks
while naming robot-2: garbage, a certificate of another CA, robot-2's own (public) certificate
with a bad signature, an expired and a revoked certificate of robot-2, and, from a genuine
device, a result signed by robot-3 sent as robot-2. The defence holds when robot-2 keeps its
place and its next step, and only robot-3 (which authenticated, then misbehaved) is dropped.
A claimed id that keeps failing is ignored for a while (one log line), never robot-2 itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging

import pytest
from nvflare.edge.constants import EdgeApiStatus
from nvflare.edge.web.models.device_info import DeviceInfo
from nvflare.edge.web.models.result_report import ResultReport
from nvflare.edge.web.models.task_request import TaskRequest
from nvflare.edge.web.models.user_info import UserInfo

from app_custom.device_identity import sign_message
from app_custom.edge_messages import answer_payload, result_body
from provisioning.identities import DeviceCA

from .test_hierarchy_poll_replay import JOB_ID, _enrol, admitted, make_fleet

VICTIM = "robot-2"


@pytest.fixture
def fleet(tmp_path):
    return make_fleet(tmp_path)


def _report(claimed: str, result: dict) -> ResultReport:
    info = DeviceInfo(claimed, app_name="fleetnest", platform="linux")
    return ResultReport(info, UserInfo(), JOB_ID, "task", "train", EdgeApiStatus.OK, result)


def _forged_results(ca: DeviceCA, tmp_path, spec: dict) -> dict[str, dict]:
    """What an attacker without robot-2's key can send in its name."""
    payload = answer_payload(VICTIM, "train", spec, b"advert", {})
    stranger = DeviceCA.create(tmp_path / "other_ca", "another-fleet").issue(VICTIM, 7)
    victim_cert = (tmp_path / "devices" / VICTIM / "device.crt").read_bytes()
    bad_signature = json.loads(sign_message(payload, stranger.key_pem, stranger.cert_pem))
    bad_signature["cert"] = base64.b64encode(victim_cert).decode()  # robot-2's public certificate, no key
    expired = ca.issue(VICTIM, 1, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    superseded = ca.issue(VICTIM, 7)
    ca.revoke(superseded.serial)
    return {
        "garbage": {"envelope": "bm90IGFuIGVudmVsb3Bl"},
        "no envelope": {"answer": "trust me"},
        "another CA": result_body(sign_message(payload, stranger.key_pem, stranger.cert_pem)),
        "bad signature": result_body(json.dumps(bad_signature).encode()),
        "expired": result_body(sign_message(payload, expired.key_pem, expired.cert_pem)),
        "revoked": result_body(sign_message(payload, superseded.key_pem, superseded.cert_pem)),
    }


def _refresh_crl(ca: DeviceCA, leaf) -> None:
    target = leaf.executor._authenticator.dir / "crl.pem"  # what `fleetnest provision crl` distributes
    target.write_bytes((ca.dir / "crl.pem").read_bytes())


def test_a_result_that_fails_its_check_never_drops_the_device_it_names(fleet, tmp_path):
    ca, leaves, devices = fleet
    leaf = leaves["eu-depot-1"]
    for device in ("robot-1", VICTIM, "robot-3"):
        _enrol(devices[device], leaf)
    assert leaf.updater.session.stage == "train"
    forged = _forged_results(ca, tmp_path, leaf.updater.session.spec)
    _refresh_crl(ca, leaf)
    for what, result in forged.items():
        reply = leaf.report(_report(VICTIM, result))
        assert reply["status"] == EdgeApiStatus.INVALID_REQUEST, what
    reply = devices[VICTIM].poll(leaf)
    assert reply["status"] == EdgeApiStatus.OK and reply["task_data"]["stage"] == "train", (
        f"forged results naming {VICTIM} cost it its step: {reply}"
    )


def test_a_forged_result_during_enrolment_leaves_the_cohort_as_it_is(fleet):
    _, leaves, devices = fleet
    leaf = leaves["eu-depot-1"]
    _enrol(devices[VICTIM], leaf)
    leaf.report(_report(VICTIM, {"envelope": "bm90IGFuIGVudmVsb3Bl"}))
    assert VICTIM in leaf.cohort, "a certificate-less result removed the device it named from the cohort"


def test_only_the_authenticated_signer_is_dropped_when_it_poses_as_another(fleet, tmp_path, caplog):
    _, leaves, devices = fleet
    leaf = leaves["eu-depot-1"]
    for device in ("robot-1", VICTIM, "robot-3"):
        _enrol(devices[device], leaf)
    spec = leaf.updater.session.spec
    key, cert = ((tmp_path / "devices" / "robot-3" / f).read_bytes() for f in ("device.key", "device.crt"))
    caplog.set_level(logging.WARNING)
    reply = leaf.report(
        _report(VICTIM, result_body(sign_message(answer_payload(VICTIM, "train", spec, b"x", {}), key, cert)))
    )
    assert reply["status"] == EdgeApiStatus.INVALID_REQUEST
    assert devices[VICTIM].poll(leaf)["status"] == EdgeApiStatus.OK, f"{VICTIM} lost its step to robot-3's forgery"
    third = devices["robot-3"].poll(leaf)
    assert third.get("task_data") is None, "robot-3 authenticated, then posed as robot-2: it takes no further part"
    assert any("signed by robot-3" in r.getMessage() for r in caplog.records)


def test_a_claimed_id_that_keeps_failing_is_ignored_for_a_while_but_its_device_is_not(fleet, tmp_path, caplog):
    ca, leaves, devices = fleet
    leaf = leaves["eu-depot-1"]
    for device in ("robot-1", VICTIM, "robot-3"):
        _enrol(devices[device], leaf)
    stranger = DeviceCA.create(tmp_path / "other_ca", "another-fleet").issue(VICTIM, 7)
    payload = answer_payload(VICTIM, "train", leaf.updater.session.spec, b"advert", {})
    flood = result_body(sign_message(payload, stranger.key_pem, stranger.cert_pem))
    caplog.set_level(logging.WARNING)
    replies = [leaf.report(_report(VICTIM, flood)) for _ in range(200)]
    assert all(r["status"] == EdgeApiStatus.INVALID_REQUEST for r in replies)
    assert "too often" in replies[-1]["message"], "the same failing certificate was checked again and again"
    lines = [r.getMessage() for r in caplog.records if repr(VICTIM) in r.getMessage()]
    assert len(lines) < 20, f"every failed request was checked and logged again ({len(lines)} lines)"
    assert any("ignored for" in line for line in lines), lines
    # the device itself, whose certificate the leaf knows, is not locked out by the flood
    reply = devices[VICTIM].poll(leaf)
    assert reply["status"] == EdgeApiStatus.OK and reply["task_data"]["stage"] == "train", reply
    # nor are polls in its name with forged tokens any use meanwhile
    info = DeviceInfo(VICTIM, app_name="fleetnest", platform="linux")
    assert not admitted(leaf.poll(TaskRequest(info, UserInfo(), JOB_ID, {"poll": "bm90IGEgdG9rZW4="})))


@pytest.mark.parametrize("kind", ["result", "poll"])
def test_failures_under_many_claimed_ids_take_bounded_memory(fleet, tmp_path, kind):
    _, leaves, _ = fleet
    leaf = leaves["eu-depot-1"]
    executor = leaf.executor
    executor.failures.capacity = executor.noisy.capacity = 200  # the real bounds are larger; the rule is the same
    stranger = DeviceCA.create(tmp_path / "other_ca", "another-fleet").issue("ghost", 7)
    foreign = result_body(sign_message(b"{}", stranger.key_pem, stranger.cert_pem))
    for n in range(3 * 200):
        info = DeviceInfo(f"ghost-{n}", app_name="fleetnest", platform="linux")
        if kind == "result":
            leaf.report(ResultReport(info, UserInfo(), JOB_ID, "task", "train", EdgeApiStatus.OK, foreign))
        else:
            leaf.poll(TaskRequest(info, UserInfo(), JOB_ID, {"poll": "eA=="}))
    assert len(executor.noisy) == 200
    assert len(executor.failures) == (200 if kind == "result" else 0)


def test_a_genuine_answer_replayed_under_another_id_or_again_costs_no_device_its_step(fleet, tmp_path, caplog):
    """A device's answer is bound to its session and stage (and signed with its payload naming it):
    replayed in its own name it is a duplicate, under another id it is refused, and neither drops
    anyone (the replayer is not the signer)."""
    _, leaves, devices = fleet
    leaf = leaves["eu-depot-1"]
    for device in ("robot-1", VICTIM, "robot-3"):
        _enrol(devices[device], leaf)
    spec = leaf.updater.session.spec
    key, cert = ((tmp_path / "devices" / "robot-3" / f).read_bytes() for f in ("device.key", "device.crt"))
    genuine = result_body(sign_message(answer_payload("robot-3", "train", spec, None, {}, "budget spent"), key, cert))
    assert leaf.report(_report("robot-3", genuine))["status"] == EdgeApiStatus.OK  # robot-3 sits this one out
    caplog.set_level(logging.WARNING)
    assert leaf.report(_report("robot-3", genuine))["status"] == EdgeApiStatus.INVALID_REQUEST
    assert leaf.report(_report(VICTIM, genuine))["status"] == EdgeApiStatus.INVALID_REQUEST
    messages = [r.getMessage() for r in caplog.records]
    assert any("already answered" in m for m in messages) and any("sent as robot-2" in m for m in messages)
    reply = devices[VICTIM].poll(leaf)
    assert reply["status"] == EdgeApiStatus.OK and reply["task_data"]["stage"] == "train", reply


def test_an_old_signed_answer_replayed_during_enrolment_leaves_its_signer_in_the_cohort(fleet, tmp_path):
    """The signer of an answer is not the sender of a replay: a genuine answer of robot-3 from an
    earlier session, replayed as robot-2 or as robot-3, drops neither."""
    _, leaves, devices = fleet
    leaf = leaves["eu-depot-1"]
    for device in ("robot-3", VICTIM):
        _enrol(devices[device], leaf)
    old_spec = dict(leaf.updater.session.spec, round=leaf.updater.session.session - 1)
    key, cert = ((tmp_path / "devices" / "robot-3" / f).read_bytes() for f in ("device.key", "device.crt"))
    old = result_body(sign_message(answer_payload("robot-3", "train", old_spec, b"advert", {}), key, cert))
    for claimed in (VICTIM, "robot-3"):
        assert leaf.report(_report(claimed, old))["status"] == EdgeApiStatus.INVALID_REQUEST
    assert {"robot-3", VICTIM} <= set(leaf.cohort), f"a replayed answer cost a device its place: {leaf.cohort}"
