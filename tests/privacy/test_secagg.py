"""Secure aggregation: exact sums under dropout, clean aborts, and what the aggregator sees."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy import stats

from app_custom.privacy.quantization import unpack
from app_custom.privacy.secagg import (
    MASK,
    SecAggAbort,
    neighbour_graph,
    threshold,
)
from app_custom.privacy.secagg_crypto import SessionContext

from .secagg_harness import advertise_and_share, make_round, plain_sum, run


# 10 random sizes up to 120 and the largest case (200) as an explicit example: the suite's time
# budget (25 examples up to 200 took 67 s of it)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 120), dropout=st.floats(0.0, 0.3), seed=st.integers(0, 2**32 - 1))
@example(n=200, dropout=0.3, seed=1)
@example(n=2, dropout=0.0, seed=1)
def test_secure_sum_equals_the_plain_quantized_sum(n, dropout, seed):
    r = make_round(n, seed=seed)
    rng = np.random.default_rng(seed)
    dropped = set(rng.choice(sorted(r.devices), size=math.floor(dropout * n), replace=False).tolist())
    result = run(r, dropped)
    survivors = sorted(set(r.devices) - dropped)
    assert list(result.survivors) == survivors
    assert np.array_equal(result.total, plain_sum(r, survivors))
    assert result.rejections == ()


@pytest.mark.parametrize("n", [5, 20, 60])
def test_more_dropout_than_tolerated_aborts_and_releases_nothing(n):
    r = make_round(n)
    tolerated = n - 1 - threshold(n - 1, r.params.max_dropout)  # neighbours that may drop
    dropped = set(sorted(r.devices)[: tolerated + 1])
    with pytest.raises(SecAggAbort, match="nothing is released"):
        run(r, dropped)


def test_the_k_regular_graph_gives_the_exact_sum_with_tolerated_dropout():
    r = make_round(40, neighbours=8, seed=3)
    graph = neighbour_graph(sorted(r.devices), r.params)
    assert all(len(peers) == 8 for peers in graph.values())
    # one dropped device: every neighbourhood of 9 loses at most one (tolerated: floor(0.3 * 9) = 2)
    result = run(r, {"site-7"})
    assert np.array_equal(result.total, plain_sum(r, set(r.devices) - {"site-7"}))


def test_a_masked_vector_looks_uniform_and_is_uncorrelated_with_its_delta():
    length = 40_000
    r = make_round(3, length=length, bits=12, seed=5)
    _, routed = advertise_and_share(r)
    device = "site-1"
    levels = r.levels[device]
    message = r.devices[device].masked_input(routed[device], levels)
    masked = unpack(message.payload, r.params.ring, length)
    counts = np.bincount((masked >> np.uint64(6)).astype(np.int64), minlength=64)  # top 6 of 12 bits
    assert stats.chisquare(counts).pvalue > 1e-3
    assert not np.array_equal(masked, levels)
    assert np.mean(masked == levels) < 0.01  # about 1 in 4096 by chance
    assert abs(stats.pearsonr(masked.astype(float), levels.astype(float)).statistic) < 0.03
    # a delta of all zeros gives the same picture: the mask alone carries no structure
    zeros = np.zeros(length, dtype=np.uint64)
    r2 = make_round(3, length=length, bits=12, seed=6)
    _, routed2 = advertise_and_share(r2)
    masked_zero = unpack(r2.devices[device].masked_input(routed2[device], zeros).payload, r2.params.ring, length)
    assert stats.chisquare(np.bincount((masked_zero >> np.uint64(6)).astype(np.int64), minlength=64)).pvalue > 1e-3


# ---- bad input: rejected, attributed, and the round completes or aborts cleanly ------------------------
def _reasons(r, sender):
    return [x.reason for x in r.aggregator.rejections if x.sender == sender]


def test_a_message_from_another_round_is_rejected_as_a_replay():
    old = make_round(4, context=SessionContext("job-1", 2, "leaf-a"))
    r = make_round(4)
    r.aggregator.add_advert("site-1", old.devices["site-1"].advertise())
    assert "replay" in _reasons(r, "site-1")[0]
    result = run(r)  # site-1 advertises properly afterwards; the round is whole
    assert np.array_equal(result.total, plain_sum(r, r.devices))


def test_a_replayed_or_second_masked_vector_is_rejected_and_attributed():
    r = make_round(5, seed=1)
    _, routed = advertise_and_share(r)
    msgs = {d: r.devices[d].masked_input(routed[d], r.levels[d]) for d in routed}
    for d, m in msgs.items():
        r.aggregator.add_masked(d, m)
    r.aggregator.add_masked("site-2", msgs["site-2"])  # the same vector again
    assert _reasons(r, "site-2") == ["duplicate message (replay)"]
    forged = dataclasses.replace(msgs["site-3"], payload=bytes(len(msgs["site-3"].payload)))
    r.aggregator.add_masked("site-3", forged)  # a different second vector: neither counts
    assert "two different masked vectors" in _reasons(r, "site-3")[0]
    request = r.aggregator.unmask_request()
    assert "site-3" in request.dropped
    for d in request.survivors:
        r.aggregator.add_unmask(d, r.devices[d].unmask(request))
    result = r.aggregator.result()
    assert np.array_equal(result.total, plain_sum(r, set(r.devices) - {"site-3"}))


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(length=15), "expected 16 in Z_2^16"),
        (dict(ring_bits=32), "expected 16 in Z_2^16"),
        (dict(payload=b"\x00" * 3), "expected 32 bytes"),
    ],
)
def test_a_masked_vector_of_the_wrong_length_or_ring_is_rejected(change, reason):
    r = make_round(4)
    _, routed = advertise_and_share(r)
    bad = dataclasses.replace(r.devices["site-1"].masked_input(routed["site-1"], r.levels["site-1"]), **change)
    r.aggregator.add_masked("site-1", bad)
    assert reason in _reasons(r, "site-1")[0]
    for d in ("site-2", "site-3", "site-4"):
        r.aggregator.add_masked(d, r.devices[d].masked_input(routed[d], r.levels[d]))
    request = r.aggregator.unmask_request()
    for d in request.survivors:
        r.aggregator.add_unmask(d, r.devices[d].unmask(request))
    assert np.array_equal(r.aggregator.result().total, plain_sum(r, ["site-2", "site-3", "site-4"]))


def test_a_message_whose_header_names_another_sender_is_rejected():
    r = make_round(3)
    r.aggregator.add_advert("site-2", r.devices["site-1"].advertise())
    assert "claims to come from 'site-1'" in _reasons(r, "site-2")[0]


def test_a_forged_sealed_share_is_attributed_to_its_dealer_and_the_round_completes():
    r = make_round(6, seed=2)
    roster, routed = advertise_and_share(r)
    sealed = dict(routed["site-4"].sealed)
    sealed["site-1"] = sealed["site-1"][:-1] + bytes([sealed["site-1"][-1] ^ 1])
    routed["site-4"] = dataclasses.replace(routed["site-4"], sealed=sealed)
    for d in routed:
        r.aggregator.add_masked(d, r.devices[d].masked_input(routed[d], r.levels[d]))
    assert any("site-4 failed authentication" in reason for reason in _reasons(r, "site-1"))
    request = r.aggregator.unmask_request()
    for d in request.survivors:
        r.aggregator.add_unmask(d, r.devices[d].unmask(request))
    assert np.array_equal(r.aggregator.result().total, plain_sum(r, r.devices))


def test_a_forged_unmask_share_is_rejected_by_its_commitment_and_attributed_to_its_holder():
    r = make_round(10, seed=4)
    _, routed = advertise_and_share(r)
    for d in routed:
        if d != "site-10":
            r.aggregator.add_masked(d, r.devices[d].masked_input(routed[d], r.levels[d]))
    request = r.aggregator.unmask_request()
    for d in request.survivors:
        answer = r.devices[d].unmask(request)
        if d == "site-2":
            x, y = answer.self_shares["site-1"]
            answer.self_shares["site-1"] = (x, (y + 1))
        r.aggregator.add_unmask(d, answer)
    assert "self share of site-1 does not match" in _reasons(r, "site-2")[0]
    assert np.array_equal(r.aggregator.result().total, plain_sum(r, set(r.devices) - {"site-10"}))


def test_an_aggregator_naming_a_device_both_survivor_and_dropped_gets_no_shares():
    r = make_round(4)
    _, routed = advertise_and_share(r)
    for d in routed:
        r.aggregator.add_masked(d, r.devices[d].masked_input(routed[d], r.levels[d]))
    request = r.aggregator.unmask_request()
    greedy = dataclasses.replace(request, dropped=("site-1",))
    with pytest.raises(Exception, match="both survivor and dropped"):
        r.devices["site-2"].unmask(greedy)


def test_too_few_devices_completing_a_stage_aborts():
    r = make_round(3)
    _, routed = advertise_and_share(r)
    r.aggregator.add_masked("site-1", r.devices["site-1"].masked_input(routed["site-1"], r.levels["site-1"]))
    with pytest.raises(SecAggAbort, match=f"completed '{MASK}'"):
        r.aggregator.unmask_request()


def test_a_device_refuses_a_roster_too_small_to_hide_it():
    r = make_round(3)
    small = dataclasses.replace(r.params, min_survivors=3)
    device = type(r.devices["site-1"])("site-1", small)
    r.aggregator.add_advert("site-1", device.advertise())
    r.aggregator.add_advert("site-2", r.devices["site-2"].advertise())
    with pytest.raises(Exception, match="roster of 2, below 3"):
        device.share_keys(r.aggregator.roster())
