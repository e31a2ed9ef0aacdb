"""A leaf's secure-aggregation session driven by device polls: the released sum is the cohort's
sum, a silent device is waited for only until the stage's deadline, and every message that does
not belong (wrong stage, a replay, garbage, a stranger) is refused with a reason while the
session goes on."""

from __future__ import annotations

import numpy as np
import pytest

from app_custom.cluster.leaf_cohort import DONE, ENROL, MASK, SHARE, TRAIN, UNMASK, CohortRefusal, LeafCohort
from app_custom.privacy.private_update import PrivacySettings, prepare_update, session_params
from app_custom.privacy.secagg import Roster, SecAggDevice, UnmaskRequest
from app_custom.privacy.wire import decode_message, encode_message

SHAPES = {"slow.w": (6, 5), "slow.b": (5,)}
PRIVACY = {
    "dp": {"clip_norm": 4.0, "noise_multiplier": 0.0, "delta": 1e-5, "fleet_size": 10, "cohort_size": 4},
    "secure_aggregation": True,
    "ring_bits": 16,
    "weighting": "uniform",
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Device:
    """The device's side of the protocol, as ``edge_runtime.fleet_device`` runs it."""

    def __init__(self, name: str, delta: dict, settings: PrivacySettings, samples: int = 100) -> None:
        self.name, self.delta, self.settings, self.samples = name, delta, settings, samples
        self.session = self.levels = None
        self.sent: list[bytes] = []

    def answer(self, task) -> bytes:
        if task.stage == TRAIN:
            params = session_params(self.settings, task.spec, self.settings.update_length(SHAPES))
            rng = np.random.default_rng(7)
            cohort = len(task.spec["cohort"])
            self.levels, _ = prepare_update(
                self.delta, SHAPES, self.settings, cohort, rng, params.context, self.samples
            )
            self.session = SecAggDevice(self.name, params)
            out = self.session.advertise()
        elif task.stage == SHARE:
            out = self.session.share_keys(decode_message(task.message, Roster))
        elif task.stage == MASK:
            out = self.session.masked_input(decode_message(task.message, dict)[self.name], self.levels)
        else:
            out = self.session.unmask(decode_message(task.message, UnmaskRequest))
        raw = encode_message(out)
        self.sent.append(raw)
        return raw


def _cohort(clock, size=4, min_devices=2, privacy=PRIVACY, **kw):
    return LeafCohort(
        job_id="job-1",
        leaf="eu-depot-1",
        session=1,
        base_version=3,
        settings=PrivacySettings.from_dict(privacy),
        shapes=SHAPES,
        cohort_size=size,
        min_devices=min_devices,
        stage_timeout=10.0,
        clock=clock,
        **kw,
    )


def _devices(n, seed=0):
    rng = np.random.default_rng(seed)
    settings = PrivacySettings.from_dict(PRIVACY)
    return {
        f"robot-{i}": Device(
            f"robot-{i}", {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in SHAPES.items()}, settings
        )
        for i in range(n)
    }


def _run_stage(cohort, devices, silent=()):
    for name, device in devices.items():
        task = cohort.task_for(name)
        if task is not None and name not in silent:
            cohort.submit(name, task.stage, device.answer(task))


def test_the_released_sum_is_the_sum_of_the_cohorts_deltas():
    clock, devices = Clock(), _devices(4)
    cohort = _cohort(clock)
    for name in devices:
        assert cohort.task_for(name) is None  # enrolment: the cohort fills up first
    assert cohort.stage == TRAIN and cohort.spec["cohort"] == sorted(devices)
    while not cohort.done:
        _run_stage(cohort, devices)
    assert cohort.failure is None and cohort.rejections == []
    leaf_sum = cohort.outcome
    assert (leaf_sum.leaf, leaf_sum.base_version, leaf_sum.count, leaf_sum.weight) == ("eu-depot-1", 3, 4, 4.0)
    for name, shape in SHAPES.items():
        plain = sum(d.delta[name] for d in devices.values())
        assert leaf_sum.total[name].shape == shape
        assert np.allclose(leaf_sum.total[name], plain, atol=0.01)


def test_a_silent_device_is_waited_for_until_the_deadline_and_its_masks_are_recovered():
    clock, devices = Clock(), _devices(4)
    cohort = _cohort(clock)
    for name in devices:
        cohort.task_for(name)
    _run_stage(cohort, devices)  # train: all advertise
    _run_stage(cohort, devices)  # share
    assert cohort.stage == MASK
    _run_stage(cohort, devices, silent={"robot-2"})
    assert cohort.stage == MASK  # still waiting for robot-2
    clock.now += 10.5
    cohort.tick()
    assert cohort.stage == UNMASK
    _run_stage(cohort, devices)
    assert cohort.done and cohort.outcome.count == 3
    plain = sum(d.delta["slow.b"] for n, d in devices.items() if n != "robot-2")
    assert np.allclose(cohort.outcome.total["slow.b"], plain, atol=0.01)


def test_enrolment_closes_at_its_deadline_with_enough_devices_and_waits_without():
    clock = Clock()
    cohort = _cohort(clock, size=4, min_devices=3)
    cohort.task_for("robot-0"), cohort.task_for("robot-1")
    clock.now += 11
    cohort.tick()
    assert cohort.stage == ENROL  # two of at least three: keep enrolling
    cohort.task_for("robot-2")
    clock.now += 11
    cohort.tick()
    assert cohort.stage == TRAIN and cohort.spec["cohort"] == ["robot-0", "robot-1", "robot-2"]
    assert cohort.task_for("robot-3") is None and "robot-3" not in cohort.spec["cohort"]


def test_out_of_place_messages_are_refused_with_a_reason_and_the_session_goes_on():
    clock, devices = Clock(), _devices(3)
    cohort = _cohort(clock, size=3)
    for name in devices:
        cohort.task_for(name)
    first = devices["robot-0"].answer(cohort.task_for("robot-0"))
    with pytest.raises(CohortRefusal, match="stage 'share' while the session is at 'train'"):
        cohort.submit("robot-0", SHARE, first)
    with pytest.raises(CohortRefusal, match="robot-9 has no part"):
        cohort.submit("robot-9", TRAIN, first)
    with pytest.raises(CohortRefusal, match="expected bytes|header"):
        cohort.submit("robot-1", TRAIN, b"\x00\x01garbage")
    cohort.submit("robot-0", TRAIN, first)
    with pytest.raises(CohortRefusal, match="already answered"):
        cohort.submit("robot-0", TRAIN, first)
    with pytest.raises(CohortRefusal):  # robot-0's advert, sent as robot-2's: the header names its sender
        cohort.submit("robot-2", TRAIN, first)
    assert {r.sender for r in cohort.rejections} >= {"robot-1", "robot-2"}
    clock.now += 11
    cohort.tick()  # only robot-0 advertised: too few to hide anyone
    assert cohort.stage == DONE and cohort.outcome is None and "aborted" in cohort.failure


def test_a_device_sitting_out_is_not_counted():
    clock, devices = Clock(), _devices(4)
    cohort = _cohort(clock)
    for name in devices:
        cohort.task_for(name)
    cohort.submit("robot-3", TRAIN, None, skip_reason="privacy budget spent")
    while not cohort.done:
        _run_stage(cohort, {n: d for n, d in devices.items() if n != "robot-3"})
        clock.now += 11 if cohort.stage == TRAIN else 0
    assert cohort.outcome.count == 3 and cohort.skipped == {"robot-3": "privacy budget spent"}


def test_under_sample_weighting_the_sum_carries_each_devices_weight():
    privacy = {k: v for k, v in PRIVACY.items() if k != "weighting"} | {"weight_cap": 256}
    settings = PrivacySettings.from_dict(privacy)
    assert settings.weighted
    rng = np.random.default_rng(3)
    devices = {
        f"robot-{i}": Device(
            f"robot-{i}", {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in SHAPES.items()}, settings, n
        )
        for i, n in enumerate([64, 128, 256])
    }
    clock = Clock()
    cohort = _cohort(clock, size=3, privacy=privacy)
    for name in devices:
        cohort.task_for(name)
    while not cohort.done:
        _run_stage(cohort, devices)
    # min(samples / weight_cap, 1), at least min_weight (0.5: 64 samples count as 128)
    weights = {"robot-0": 0.5, "robot-1": 0.5, "robot-2": 1.0}
    assert cohort.outcome.count == 3 and cohort.outcome.weight == pytest.approx(2.0, abs=0.01)
    expected = sum(weights[n] * d.delta["slow.w"] for n, d in devices.items())
    assert np.allclose(cohort.outcome.total["slow.w"], expected, atol=0.01)


def test_a_dropped_device_gets_no_further_step_and_the_others_need_not_wait_for_it():
    clock, devices = Clock(), _devices(4)
    cohort = _cohort(clock)
    for name in devices:
        cohort.task_for(name)
    _run_stage(cohort, devices)  # train
    _run_stage(cohort, devices)  # share
    cohort.drop("robot-1")  # e.g. its certificate was revoked
    assert cohort.task_for("robot-1") is None
    _run_stage(cohort, {n: d for n, d in devices.items() if n != "robot-1"})
    assert cohort.stage == UNMASK  # no deadline needed: everyone else answered
    _run_stage(cohort, devices)
    assert cohort.done and cohort.outcome.count == 3
