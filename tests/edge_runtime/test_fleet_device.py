"""The device of the hierarchy against a real leaf session, in one process: three devices with
the shipped job's model and data train, protect their slow deltas and complete a secure sum; what
they send is only protocol messages (no fast-layer value), and an attempt to send anything else
is caught before it leaves."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from app_custom.cluster.leaf_cohort import LeafCohort
from app_custom.privacy import device_round
from app_custom.privacy.private_update import PrivacySettings
from edge_runtime.fleet_device import LEDGER_FILE, STATE_FILE, FleetDevice
from jobs.nested_fleet.job import settings as job_settings


@pytest.fixture(scope="module")
def job():
    return job_settings(argparse.Namespace(devices=8, cohort=3, noise=0.05))


def _enrolled_cohort(job, weights, devices) -> LeafCohort:
    """A leaf's session with ``devices`` enrolled, at its train stage."""
    cohort = LeafCohort(
        job_id="job-1",
        leaf="eu-depot-1",
        session=1,
        base_version=0,
        settings=PrivacySettings.from_dict(job["privacy"]),
        shapes={name: value.shape for name, value in weights.items()},
        cohort_size=3,
        min_devices=2,
        stage_timeout=60,
    )
    for name in devices:
        cohort.task_for(name)
    return cohort


def test_devices_complete_a_secure_sum_and_send_nothing_but_protocol_messages(job, tmp_path, monkeypatch):
    protected = []  # what each device hands to clipping, noise, quantization and masking
    real_prepare = device_round.prepare_update
    monkeypatch.setattr(
        device_round,
        "prepare_update",
        lambda delta, *a, **k: protected.append(dict(delta)) or real_prepare(delta, *a, **k),
    )
    devices = {
        f"robot-{i}": FleetDevice(f"robot-{i}", job["config"], job["data"], job["privacy"], i, tmp_path / f"d{i}")
        for i in range(3)
    }
    weights = devices["robot-0"].learner.initial_slow()
    cohort = _enrolled_cohort(job, weights, devices)
    sent: dict[str, list[bytes]] = {name: [] for name in devices}
    while not cohort.done:
        for name, device in devices.items():
            task = cohort.task_for(name)
            if task is None:
                continue
            message, skip, metrics = device.answer(
                task.stage, task.spec, 0, weights if task.stage == "train" else None, task.message
            )
            assert skip is None and device.leaving_problems(message, metrics) == []
            sent[name].append(message)
            cohort.submit(name, task.stage, message)
    assert cohort.failure is None and cohort.outcome.count == 3
    assert len(protected) == 3
    for delta in protected:  # only slow layers go into the protected update: fast layers never leave
        assert set(delta) == set(devices["robot-0"].learner.shared_names)
    for name in devices:
        assert len(sent[name]) == 4  # advert, shares, masked vector, unmask shares
        assert (tmp_path / f"d{name[-1]}" / STATE_FILE).exists()
        ledger = json.loads((tmp_path / f"d{name[-1]}" / LEDGER_FILE).read_text())
        assert len(ledger["history"]) == 1  # charged once, before the masked vector left


def test_anything_but_a_protocol_message_is_stopped_before_it_leaves(job, tmp_path):
    device = FleetDevice("robot-0", job["config"], job["data"], job["privacy"], 0, tmp_path)
    fast = next(p for n, p in device.learner.model.named_parameters() if n in device.learner.private_names)
    leak = np.ascontiguousarray(fast.detach().numpy(), dtype=np.float32).tobytes()
    assert any("not a device secure-aggregation message" in p for p in device.leaving_problems(leak, {}))
    assert device.leaving_problems(None, {"acc": np.zeros(3)})  # an array hidden in the metrics


def test_a_device_restarted_mid_session_carries_on_from_its_state(job, tmp_path):
    def make(i):
        return FleetDevice(f"robot-{i}", job["config"], job["data"], job["privacy"], i, tmp_path / f"d{i}")

    devices = {f"robot-{i}": make(i) for i in range(3)}
    weights = devices["robot-0"].learner.initial_slow()
    cohort = _enrolled_cohort(job, weights, devices)
    stages = 0
    while not cohort.done:
        for name in list(devices):
            task = cohort.task_for(name)
            if task is None:
                continue
            train = weights if task.stage == "train" else None
            message, _, _ = devices[name].answer(task.stage, task.spec, 0, train, task.message)
            cohort.submit(name, task.stage, message)
        stages += 1
        if stages == 2:  # after sharing: robot-1's process dies and starts again from its state folder
            devices["robot-1"] = make(1)
    assert cohort.failure is None and cohort.outcome.count == 3  # robot-1's masked vector made it in
    assert not (tmp_path / "d1" / "secagg_session.json").exists()  # the finished session is discarded


def test_a_device_signs_each_leaf_challenge_once_and_lets_a_stale_one_go(tmp_path):
    """The device's side of the leaf's poll challenges: one signed token per challenge, for the leaf
    that issued it, none for a challenge past half its window (the leaf would refuse it)."""
    from app_custom.device_identity import DeviceAuthenticator
    from app_custom.edge_messages import PollChallenges, read_poll_cookie, read_poll_token
    from edge_runtime.fleet_device import DeviceIdentity, PollTokens
    from provisioning.identities import DeviceCA

    ca = DeviceCA.create(tmp_path / "ca", "fleetnest-test")
    issued = ca.issue("robot-1", 7)
    (tmp_path / "device.key").write_bytes(issued.key_pem)
    (tmp_path / "device.crt").write_bytes(issued.cert_pem)
    now = [0.0]
    leaf = PollChallenges("job-1", "eu-depot-1", window=60, clock=lambda: now[0])
    tokens = PollTokens("robot-1", DeviceIdentity(tmp_path), clock=lambda: now[0])
    assert tokens.cookie("job-1") == {}  # no challenge yet: the first poll asks for one
    tokens.take(leaf.issue("robot-1"))
    cookie = tokens.cookie("job-1")
    device, payload = DeviceAuthenticator(ca.dir).open(read_poll_cookie(cookie))
    token = read_poll_token(payload)
    assert device == "robot-1" and token["leaf"] == "eu-depot-1" and token["job_id"] == "job-1"
    leaf.spend(leaf.check(token, "robot-1"))
    assert tokens.cookie("job-1") == {}  # used: the next poll waits for the next challenge
    tokens.take(leaf.issue("robot-1"))
    now[0] += 31  # past half the window by the device's clock: not worth sending
    assert tokens.cookie("job-1") == {}
