"""Fixed-point stochastic quantization into Z_2^bits: unbiased, and a cohort's sum never wraps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app_custom.privacy.quantization import QuantizationError, Ring, decode_sum, pack, quantize, unpack
from app_custom.privacy.shamir import Combiner, ShamirError, split


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(4, 32), cohort=st.integers(1, 1000), sign=st.sampled_from([-1.0, 1.0]))
def test_the_sum_of_a_full_cohort_at_the_clamp_does_not_wrap(bits, cohort, sign):
    try:
        ring = Ring(bits, cohort, 2.0)
    except QuantizationError:
        return  # too few bits for this cohort: refused up front
    one = quantize(np.full(4, sign * 5.0), ring, np.random.default_rng(0))  # clamped to +-2
    total = (one * np.uint64(cohort)) % np.uint64(ring.modulus)
    assert np.allclose(decode_sum(total, ring), sign * cohort * 2.0)


def test_stochastic_rounding_is_unbiased():
    ring = Ring(8, 4, 1.0)  # 6 bits per value: a coarse grid of step 1/31
    values = np.full(200_000, 0.0123)
    decoded = decode_sum(quantize(values, ring, np.random.default_rng(1)), ring)
    assert abs(decoded.mean() - 0.0123) < 3 * decoded.std() / np.sqrt(len(values))
    assert len(np.unique(decoded)) == 2  # it rounds to the two neighbouring levels only


def test_a_ring_too_small_for_the_cohort_is_refused_with_the_bits_it_needs():
    with pytest.raises(QuantizationError, match="no level per value for a cohort of 1000.*use more bits"):
        Ring(10, 1000, 1.0)  # 511 levels on each side for 1000 devices


def test_nan_is_refused():
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(np.array([0.0, np.nan]), Ring(16, 2, 1.0), np.random.default_rng(0))


@pytest.mark.parametrize("bits", [2, 7, 14, 16, 31, 32])
def test_packing_round_trips_at_the_wire_size(bits):
    ring = Ring(bits, 1, 1.0)
    values = np.random.default_rng(bits).integers(0, ring.modulus, size=1001, dtype=np.uint64)
    payload = pack(values, ring)
    assert len(payload) == ring.wire_bytes(1001) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack(payload, ring, 1001), values)
    with pytest.raises(QuantizationError, match="bytes"):
        unpack(payload + b"\x00", ring, 1001)


def test_any_threshold_of_shamir_shares_recovers_the_secret_and_fewer_do_not():
    secret = bytes(range(16))
    shares = split(secret, 5, [3, 9, 10, 11, 20, 42, 43])
    combiner = Combiner()
    rng = np.random.default_rng(0)
    for _ in range(10):
        chosen = [shares[i] for i in rng.choice(len(shares), size=5, replace=False)]
        assert combiner.combine(chosen, 5) == secret
    with pytest.raises(ShamirError, match="need 5 shares"):
        combiner.combine(shares[:4], 5)
    forged = shares[:4] + [(shares[4][0], (shares[4][1] + 1) % (2**130 - 5))]
    try:  # the sum of a forged share decodes to another secret, or to no 16-byte secret at all
        assert combiner.combine(forged, 5) != secret
    except ShamirError as err:
        assert "do not encode" in str(err)
