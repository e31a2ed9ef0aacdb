"""A device's update through clipping, weighting and quantization, and the cohort mean decoded from the sum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app_custom.privacy.dp import PrivacyConfigError
from app_custom.privacy.private_update import PrivacySettings, cohort_mean, prepare_update
from app_custom.privacy.quantization import decode_sum
from app_custom.privacy.rotation import rotate, rotation_signs, unrotate
from app_custom.privacy.secagg_crypto import SessionContext

SHAPES = {"trunk.w": (20, 10), "head.b": (5,)}
CONTEXT = SessionContext("job", 3, "cohort")


def settings(**overrides) -> PrivacySettings:
    dp = {"clip_norm": 4.0, "noise_multiplier": 0.0, "delta": 1e-5, "fleet_size": 6, "cohort_size": 6}
    return PrivacySettings.from_dict({"dp": dp} | overrides)


def _deltas(rng, n):
    return [{name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in SHAPES.items()} for _ in range(n)]


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_the_decoded_cohort_mean_is_the_weighted_mean_of_the_clipped_deltas(weighting):
    rng = np.random.default_rng(0)
    s = settings(weighting=weighting, weight_cap=100)
    deltas, samples = _deltas(rng, 6), [10, 40, 100, 250, 5, 60]
    ring = s.ring(6, s.update_length(SHAPES))
    total = np.zeros(s.update_length(SHAPES), dtype=np.uint64)
    for delta, n in zip(deltas, samples):
        levels, _ = prepare_update(delta, SHAPES, s, 6, rng, CONTEXT, n)
        assert levels.shape == (s.update_length(SHAPES),)
        total = (total + levels) % np.uint64(ring.modulus)
    mean = cohort_mean(decode_sum(total, ring), 6, SHAPES, s, CONTEXT)
    weights = [min(n / 100, 1.0) for n in samples] if weighting == "samples" else [1.0] * 6
    expected = sum(w * d["trunk.w"] for w, d in zip(weights, deltas)) / sum(weights)
    step = 1 / ring.scale  # stochastic rounding: unbiased, error of a few steps at most
    assert np.abs(mean["trunk.w"] - expected).max() < 4 * step * math.sqrt(6) / sum(weights) + 1e-6
    assert mean["head.b"].shape == (5,)


def test_a_long_delta_is_clipped_so_one_device_moves_the_sum_by_at_most_the_clip_norm():
    rng = np.random.default_rng(1)
    s = settings()
    huge = {name: np.full(shape, 10.0, np.float32) for name, shape in SHAPES.items()}
    levels, norm = prepare_update(huge, SHAPES, s, 6, rng, CONTEXT, 1000)
    assert norm > 100
    ring = s.ring(6, levels.size)
    rounding = math.sqrt(levels.size) / ring.scale  # stochastic rounding moves each value by under a step
    assert np.linalg.norm(decode_sum(levels, ring)) <= 4.0 + rounding


def test_weighting_needs_a_sample_count_and_bad_weighting_settings_are_refused():
    with pytest.raises(ValueError, match="sample count"):
        prepare_update(
            _deltas(np.random.default_rng(0), 1)[0], SHAPES, settings(), 6, np.random.default_rng(0), CONTEXT
        )
    with pytest.raises(PrivacyConfigError, match="weighting"):
        settings(weighting="by-battery")
    with pytest.raises(PrivacyConfigError, match="weight_cap"):
        settings(weight_cap=0)
    with pytest.raises(PrivacyConfigError, match="ring_bits"):
        settings(ring_bits=3)


def test_the_rotation_is_orthogonal_linear_and_fresh_every_round():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=1001), rng.normal(size=1001)
    assert np.allclose(unrotate(rotate(x, CONTEXT), CONTEXT), x)
    assert np.isclose(np.linalg.norm(rotate(x, CONTEXT)), np.linalg.norm(x))
    assert np.allclose(rotate(x, CONTEXT) + rotate(y, CONTEXT), rotate(x + y, CONTEXT))
    other = SessionContext("job", 4, "cohort")
    assert not np.allclose(rotate(x, other), rotate(x, CONTEXT))


def test_a_delta_with_all_its_norm_on_one_value_is_spread_and_decoded_to_within_a_few_steps():
    # unrotated, the ring would have to reach the clip bound (4): a step six times as wide
    shapes = {"trunk.w": (50, 100), "head.b": (5,)}
    s = settings()
    length = s.update_length(shapes)
    ring = s.ring(6, length)
    assert ring.clamp < 4.0 / 6
    spike = {"trunk.w": np.zeros((50, 100), np.float32), "head.b": np.zeros(5, np.float32)}
    spike["head.b"][2] = 2.0
    # the device sends (w * delta, w * bound) with w = 1 here: the spike, and the weight's value
    sent = np.append(np.concatenate([spike[k].ravel() for k in sorted(shapes)]), 4.0 / math.sqrt(2))
    assert np.abs(rotate(sent, CONTEXT)).max() < ring.clamp  # nothing is clamped
    rng = np.random.default_rng(3)
    total = np.zeros(length, dtype=np.uint64)
    for _ in range(6):
        levels, _ = prepare_update(spike, shapes, s, 6, rng, CONTEXT, 300)
        total = (total + levels) % np.uint64(ring.modulus)
    mean = cohort_mean(decode_sum(total, ring), 6, shapes, s, CONTEXT)
    assert abs(mean["head.b"][2] - 2.0) < 4 / ring.scale
    assert np.abs(mean["trunk.w"]).max() < 4 / ring.scale


def test_the_rotation_signs_are_pinned_so_every_platform_rotates_alike():
    # SHAKE-256 bits, not a NumPy generator stream: a device and its aggregator on different NumPy
    # builds must agree, or the sum rotated back is garbage
    pinned = [1, 1, -1, -1, -1, -1, -1, 1, 1, 1, -1, -1, -1, 1, -1, 1]
    assert rotation_signs(CONTEXT, 16).tolist() == pinned
    spike = np.zeros(16)
    spike[2] = 1.0
    assert np.isclose(rotate(spike, CONTEXT)[0], -1 / 4)  # DCT-II's first row is 1/sqrt(16); sign -1
