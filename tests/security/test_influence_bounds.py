"""Attacks 2 and 3: one crafted device steering its cohort's sum, one leaf inflating its count.

Secure aggregation hides each device's vector, so nobody can check that it was clipped: a device
may send any ring element. What bounds its influence is what every released sum must satisfy:
a decoded sum no longer than ``n`` clipped devices (with their noise and rounding) can reach,
and a summed weight no lighter than ``n`` devices' floor. The released mean then lies in a ball
of radius ``R = cohort_bound(n).norm / cohort_bound(n).min_weight``, so one crafted device moves
it by at most ``2 R`` (about twice the clip bound over ``min_weight``). No maintained Python
library offers range or norm proofs for secure aggregation, so this is the bound that holds.
The cohort runs with the fleet job's privacy settings (3 devices, clip 8, 12-bit ring).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from app_custom.cluster.aggregation import SlowDeltaAggregator
from app_custom.cluster.leaf_cohort import TRAIN, LeafCohort
from app_custom.cluster.leaf_sums import LeafPolicy, LeafSum, LeafSumCombiner
from app_custom.privacy.device_round import DeviceRound
from app_custom.privacy.private_update import PrivacySettings, cohort_bound, flatten
from app_custom.privacy.rotation import rotate
from app_custom.privacy.secagg import SecAggDevice
from app_custom.privacy.wire import encode_message

SHAPES = {"slow.w": (40, 30), "slow.b": (30,)}
FLEET_JOB = {
    "dp": {
        "clip_norm": 8.0,
        "noise_multiplier": 0.05,
        "delta": 1e-5,
        "fleet_size": 8,
        "cohort_size": 3,
        "min_cohort": 2,
    },
    "ring_bits": 12,
}
SETTINGS = PrivacySettings.from_dict(FLEET_JOB)
LENGTH = SETTINGS.update_length(SHAPES)
DIRECTION = {k: np.ones(s) for k, s in SHAPES.items()}  # where the attacker wants the fleet to go


class Crafted:
    """A device that skips clipping and noise: it sends whatever ring elements it likes."""

    def __init__(self, name: str, scale: float, weight_level: int | None = None) -> None:
        self.name, self.scale, self.weight_level = name, scale, weight_level

    def begin(self, spec):
        from app_custom.privacy.private_update import session_params

        params = session_params(SETTINGS, spec, LENGTH)
        ring = params.ring
        vector = np.append(flatten(DIRECTION, SHAPES), 0.0)
        rotated = rotate(vector / np.linalg.norm(vector), params.context) * self.scale * ring.scale
        levels = np.clip(np.round(rotated), -(ring.modulus // 2 - 1), ring.modulus // 2 - 1).astype(np.int64)
        if self.weight_level is not None:
            # the weight rides in the last value before rotation: shift the whole vector's projection
            unit = rotate(np.eye(1, LENGTH, LENGTH - 1).ravel(), params.context)
            levels = levels + np.round(unit * self.weight_level).astype(np.int64)
            levels = np.clip(levels, -(ring.modulus // 2 - 1), ring.modulus // 2 - 1)
        self.session = SecAggDevice(self.name, params)
        self.levels = np.mod(levels, ring.modulus).astype(np.uint64)
        return self.session.advertise()

    def answer(self, stage, raw):
        from app_custom.privacy.secagg import MASK
        from app_custom.privacy.wire import decode_message

        if stage == MASK:
            return self.session.masked_input(decode_message(raw, dict)[self.name], self.levels)
        return DeviceRound(None, self.session, None).answer(stage, raw, lambda: None)


def _session(crafted: Crafted | None, seed: int = 0) -> LeafCohort:
    rng = np.random.default_rng(seed)
    honest = {f"robot-{i}": {k: rng.normal(0, 0.05, s) for k, s in SHAPES.items()} for i in (1, 2, 3)}
    leaf = LeafCohort(
        job_id="job-1",
        leaf="eu-depot-1",
        session=1,
        base_version=0,
        settings=SETTINGS,
        shapes=SHAPES,
        cohort_size=3,
        min_devices=2,
        stage_timeout=10.0,
    )
    for name in honest:
        leaf.task_for(name)
    rounds = {}
    while not leaf.done:
        for name, delta in honest.items():
            task = leaf.task_for(name)
            if task is None:
                continue
            attacker = crafted is not None and name == crafted.name
            if task.stage == TRAIN:
                if attacker:
                    out = crafted.begin(task.spec)
                else:
                    rounds[name], _ = DeviceRound.begin(name, task.spec, delta, SETTINGS, rng, samples=256)
                    out = rounds[name].advert()
            elif attacker:
                out = crafted.answer(task.stage, task.message)
            else:
                out = rounds[name].answer(task.stage, task.message, lambda: None)
            leaf.submit(name, task.stage, encode_message(out))
    return leaf


def _mean(leaf_sum: LeafSum) -> np.ndarray:
    return flatten(leaf_sum.total, SHAPES) / leaf_sum.weight


def _cluster(*sums: LeafSum):
    policy = LeafPolicy(privacy=SETTINGS, length=LENGTH, max_cohort=3)
    return LeafSumCombiner(policy, SHAPES).combine(list(sums), 0, SlowDeltaAggregator())


def _released(leaf: LeafCohort) -> LeafSum | None:
    """What reaches the version: the leaf's sum, if the leaf released it and the cluster took it."""
    if leaf.outcome is None:
        return None
    return leaf.outcome if "eu-depot-1" in _cluster(leaf.outcome).accepted else None


RADIUS = cohort_bound(SETTINGS, 3, LENGTH).norm / cohort_bound(SETTINGS, 3, LENGTH).min_weight


def test_the_stated_bound_is_a_few_clip_bounds():
    assert SETTINGS.dp.clip_norm < RADIUS < 3 * SETTINGS.dp.clip_norm / SETTINGS.min_weight


@pytest.mark.parametrize("scale", [8.0, 30.0, 45.0, 100.0, 1e4])
def test_one_crafted_vector_moves_its_cohorts_mean_by_at_most_the_bound(scale):
    honest = _session(None).outcome
    leaf = _session(Crafted("robot-3", scale))
    released = _released(leaf)
    if released is None:  # refused, with a reason
        reason = leaf.failure or _cluster(leaf.outcome).rejections[0].reason
        assert "past the" in reason
        return
    assert float(np.linalg.norm(_mean(released))) <= RADIUS
    moved = float(np.linalg.norm(_mean(released) - _mean(honest)))
    assert moved <= 2 * RADIUS, f"moved {moved:.1f}, bound {2 * RADIUS:.1f}"


@pytest.mark.parametrize("weight_level", [-400, -2000, 2000])
def test_one_crafted_weight_moves_its_cohorts_mean_by_at_most_the_bound(weight_level):
    honest = _session(None).outcome
    leaf = _session(Crafted("robot-3", 8.0, weight_level))
    released = _released(leaf)
    if released is None:
        return
    assert float(np.linalg.norm(_mean(released))) <= RADIUS
    moved = float(np.linalg.norm(_mean(released) - _mean(honest)))
    assert moved <= 2 * RADIUS, f"moved {moved:.1f}, bound {2 * RADIUS:.1f}"


def test_the_largest_crafted_vector_is_refused_by_the_leaf_with_a_reason():
    leaf = _session(Crafted("robot-3", 1e4))
    assert leaf.outcome is None
    assert "past the" in leaf.failure and "3 devices" in leaf.failure


def _honest_sum(leaf: str, count: int, rng) -> LeafSum:
    total = {k: rng.normal(0, 0.05, s) * count for k, s in SHAPES.items()}
    return LeafSum(leaf, 0, count, float(count), total)


def test_a_leaf_claiming_more_devices_than_its_cohort_is_refused_and_the_version_goes_on():
    rng = np.random.default_rng(4)
    inflated = _honest_sum("liar", 3, rng)
    inflated = LeafSum("liar", 0, 1024, 1024.0, {k: v * 1024 / 3 for k, v in inflated.total.items()})
    out = _cluster(_honest_sum("depot-a", 3, rng), _honest_sum("depot-b", 3, rng), inflated)
    assert sorted(out.accepted) == ["depot-a", "depot-b"]
    assert "registered cohort" in out.rejections[0].reason


def test_no_leaf_takes_more_than_its_share_of_a_version():
    rng = np.random.default_rng(5)
    sums = [_honest_sum("depot-a", 3, rng), _honest_sum("depot-b", 1, rng), _honest_sum("depot-c", 1, rng)]
    policy = LeafPolicy(privacy=SETTINGS, length=LENGTH, max_cohort=3, max_share=0.5)
    out = LeafSumCombiner(policy, SHAPES).combine(sums, 0, SlowDeltaAggregator())
    total = sum(out.accepted.values())
    assert out.accepted["depot-a"] / total == pytest.approx(0.5)
    assert math.isclose(out.accepted["depot-b"], out.accepted["depot-c"])


def test_every_aggregator_releases_through_the_same_bound():
    """The flat job's server and a leaf both release a securely aggregated sum through
    ``bounded_cohort_sum``: a sum no three clipped devices reach is refused, an honest one passes."""
    from app_custom.privacy.private_update import SumPastBound, bounded_cohort_sum
    from app_custom.privacy.secagg_crypto import SessionContext

    context = SessionContext("job-1", 1, "flat")
    bound = cohort_bound(SETTINGS, 3, LENGTH, 3)
    honest = np.full(LENGTH, 0.9 * bound.norm / np.sqrt(LENGTH))
    honest[-1] = 2.5 * SETTINGS.dp.clip_norm / np.sqrt(2)  # the summed weight of three devices
    _, weight = bounded_cohort_sum(honest, 3, SHAPES, SETTINGS, context, 3)
    assert weight >= cohort_bound(SETTINGS, 3, LENGTH).min_weight
    with pytest.raises(SumPastBound, match="crafted vector"):
        bounded_cohort_sum(honest * 1.2, 3, SHAPES, SETTINGS, context, 3)
