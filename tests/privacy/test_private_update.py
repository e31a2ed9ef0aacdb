"""A device's update through clipping, weighting and quantization, and the cohort mean decoded from the sum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app_custom.privacy.dp import PrivacyConfigError
from app_custom.privacy.private_update import PrivacySettings, cohort_mean, prepare_update
from app_custom.privacy.quantization import decode_sum

SHAPES = {"trunk.w": (20, 10), "head.b": (5,)}


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
    ring = s.ring(6)
    total = np.zeros(s.update_length(SHAPES), dtype=np.uint64)
    for delta, n in zip(deltas, samples):
        levels, _ = prepare_update(delta, SHAPES, s, 6, rng, n)
        assert levels.shape == (s.update_length(SHAPES),)
        total = (total + levels) % np.uint64(ring.modulus)
    mean = cohort_mean(decode_sum(total, ring), 6, SHAPES, s)
    weights = [min(n / 100, 1.0) for n in samples] if weighting == "samples" else [1.0] * 6
    expected = sum(w * d["trunk.w"] for w, d in zip(weights, deltas)) / sum(weights)
    step = 1 / ring.scale  # stochastic rounding: unbiased, error of a few steps at most
    assert np.abs(mean["trunk.w"] - expected).max() < 4 * step * math.sqrt(6) / sum(weights) + 1e-6
    assert mean["head.b"].shape == (5,)


def test_a_long_delta_is_clipped_so_one_device_moves_the_sum_by_at_most_the_clip_norm():
    rng = np.random.default_rng(1)
    s = settings()
    huge = {name: np.full(shape, 10.0, np.float32) for name, shape in SHAPES.items()}
    levels, norm = prepare_update(huge, SHAPES, s, 6, rng, 1000)
    assert norm > 100
    assert np.linalg.norm(decode_sum(levels, s.ring(6))) <= 4.0 * 1.01


def test_weighting_needs_a_sample_count_and_bad_weighting_settings_are_refused():
    with pytest.raises(ValueError, match="sample count"):
        prepare_update(_deltas(np.random.default_rng(0), 1)[0], SHAPES, settings(), 6, np.random.default_rng(0))
    with pytest.raises(PrivacyConfigError, match="weighting"):
        settings(weighting="by-battery")
    with pytest.raises(PrivacyConfigError, match="weight_cap"):
        settings(weight_cap=0)
    with pytest.raises(PrivacyConfigError, match="ring_bits"):
        settings(ring_bits=3)
