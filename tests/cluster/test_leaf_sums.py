"""The cluster's intake of leaf sums: bad sums refused with a reason, stale ones discounted,
an outlying leaf left out, and the rest averaged like any other update."""

from __future__ import annotations

import re

import numpy as np
import pytest

from app_custom.cluster.aggregation import SlowDeltaAggregator
from app_custom.cluster.leaf_sums import LeafPolicy, LeafSum, LeafSumCombiner
from app_custom.privacy.private_update import PrivacySettings

EXPECTED = {"slow.w": (30, 20), "slow.b": (20,)}


def _sum(leaf, rng, count=10, weight=None, base=5, direction=None, scale=0.5):
    weight = float(count) if weight is None else weight
    direction = direction if direction is not None else {k: np.ones(s) for k, s in EXPECTED.items()}
    unit = np.sqrt(sum(float((v**2).sum()) for v in direction.values()))
    total = {
        k: weight * (scale * v / unit + rng.normal(0, 0.001, v.shape)).astype(np.float32) for k, v in direction.items()
    }
    return LeafSum(leaf, base, count, weight, total)


def _privacy(noise=0.0, ring_bits=16, weighting="uniform", cohort=100):
    dp = {"clip_norm": 1.0, "noise_multiplier": noise, "delta": 1e-5, "fleet_size": 100, "cohort_size": cohort}
    return PrivacySettings.from_dict({"dp": dp, "ring_bits": ring_bits, "weighting": weighting})


def _combine(items, version=5, privacy=None, **policy):
    privacy = privacy or _privacy()
    aggregator = SlowDeltaAggregator()
    policy = {"max_cohort": 100, "max_share": 1.0} | policy
    combiner = LeafSumCombiner(LeafPolicy(privacy, privacy.update_length(EXPECTED), **policy), EXPECTED)
    return combiner.combine(items, version, aggregator), aggregator


def test_honest_sums_average_by_weight_and_a_stale_one_counts_less():
    rng = np.random.default_rng(0)
    fresh, stale = _sum("a", rng, count=10), _sum("b", rng, count=10, base=2)
    out, aggregator = _combine([fresh, stale])
    assert out.rejections == [] and out.devices == 20
    assert out.accepted["a"] == pytest.approx(10.0) and out.accepted["b"] == pytest.approx(10.0 / 2.0)
    mean = aggregator.mean_delta()
    expected = (fresh.total["slow.b"] + stale.total["slow.b"] / 2) / 15.0
    assert np.allclose(mean["slow.b"], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(count=0), "count must be a positive integer"),
        (dict(count=500), "exceeds the registered cohort size"),
        (dict(weight=11.0), "outside \\[10, 10\\]"),
        (dict(weight=float("nan")), "finite"),
        (dict(base_version=9), "current version is 5"),
        (dict(base_version=0), "5 behind"),
        (dict(total={"slow.w": np.zeros((30, 20), np.float32)}), "slow.b"),
        (dict(total={"slow.w": np.zeros((20, 30), np.float32), "slow.b": np.zeros(20, np.float32)}), "shape"),
        (
            dict(total={"slow.w": np.full((30, 20), np.nan, np.float32), "slow.b": np.zeros(20, np.float32)}),
            "NaN|finite",
        ),
        (dict(total={"slow.w": np.full((30, 20), 5.0, np.float32), "slow.b": np.zeros(20, np.float32)}), "past the"),
    ],
)
def test_a_malformed_or_impossible_leaf_sum_is_refused_and_named(change, reason):
    rng = np.random.default_rng(1)
    good, bad = _sum("good", rng), _sum("bad", rng)
    bad = LeafSum(**(vars(bad) | change))
    out, aggregator = _combine([good, bad])
    assert list(out.accepted) == ["good"]
    assert [r.contributor for r in out.rejections] == ["leaf bad"]
    assert re.search(reason, out.rejections[0].reason), out.rejections[0].reason
    assert aggregator.contributors == ["leaf good"]


def test_a_leaf_pointing_away_from_the_others_or_far_longer_is_left_out():
    rng = np.random.default_rng(2)
    honest = [_sum(f"h{i}", rng) for i in range(3)]
    flipped = _sum("flipped", rng, direction={k: -np.ones(s) for k, s in EXPECTED.items()})
    out, _ = _combine(honest + [flipped])
    assert sorted(out.accepted) == ["h0", "h1", "h2"]
    assert "cosine" in out.rejections[0].reason
    long = _sum("long", rng, scale=0.5 * 0.99)
    short = [_sum(f"s{i}", rng, scale=0.05) for i in range(3)]
    out, _ = _combine(short + [long])
    assert "as long as the median" in out.rejections[0].reason and "long" not in out.accepted


def test_with_two_leaves_nothing_is_called_an_outlier_but_the_absolute_bound_still_holds():
    rng = np.random.default_rng(3)
    a = _sum("a", rng)
    b = _sum("b", rng, direction={k: -np.ones(s) for k, s in EXPECTED.items()})
    out, _ = _combine([a, b])
    assert sorted(out.accepted) == ["a", "b"]
    noisy = _sum("noisy", rng, scale=3.0)  # past the clip bound: only noise could explain it
    out, _ = _combine([noisy], privacy=_privacy(noise=2.0))  # the noise of ten devices' shares
    assert list(out.accepted) == ["noisy"]
    out, _ = _combine([noisy])
    assert "past the" in out.rejections[0].reason


def test_the_bound_leaves_room_for_rounding_and_a_noisy_weight_and_bad_policies_are_refused():
    rng = np.random.default_rng(4)
    coarse = _sum("coarse", rng, count=10, scale=1.5)  # the rounding of ten coarse devices
    out, _ = _combine([coarse])
    assert "past the" in out.rejections[0].reason
    out, _ = _combine([coarse], privacy=_privacy(ring_bits=7, cohort=10), max_cohort=10)  # 6 levels: coarse
    assert list(out.accepted) == ["coarse"]
    heavy = _sum("heavy", rng, count=10, weight=11.0)  # noise on the decoded weight
    assert "outside" in _combine([heavy], privacy=_privacy(weighting="samples"))[0].rejections[0].reason
    noisy = _privacy(noise=0.5, weighting="samples")
    assert list(_combine([heavy], privacy=noisy)[0].accepted) == ["heavy"]
    with pytest.raises(ValueError, match="max_cohort"):
        LeafPolicy(_privacy(), 10, max_cohort=2.5)
    with pytest.raises(ValueError, match="max_share"):
        LeafPolicy(_privacy(), 10, max_share=1.5)
