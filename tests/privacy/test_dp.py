"""DP on the device: clipping, calibrated noise, and per-device accounting checked independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from app_custom.privacy.dp import DPConfig, PrivacyConfigError, PrivacyLedger, clip_l2, noise_for_epsilon, privatize


def config(**overrides) -> DPConfig:
    values = dict(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5, fleet_size=100, cohort_size=10)
    return DPConfig(**(values | overrides))


def independent_epsilon(z: float, rounds: int, delta: float) -> float:
    """Google's dp-accounting on the mechanism that runs: a Gaussian of multiplier ``z`` in every
    round the device contributed to, composed ``rounds`` times, no sampling."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z, fleet, cohort, rounds", [(1.1, 100, 10, 30), (0.8, 8, 8, 10), (2.0, 1000, 50, 200)])
def test_ledger_epsilon_matches_an_independent_accountant_within_one_percent(z, fleet, cohort, rounds):
    # the fleet's size buys nothing: no cohort is drawn at random, so no amplification is claimed
    ledger = PrivacyLedger(config(noise_multiplier=z, fleet_size=fleet, cohort_size=cohort))
    for _ in range(rounds):
        ledger.record_contribution()
    assert ledger.epsilon() == pytest.approx(independent_epsilon(z, rounds, 1e-5), rel=0.01)


def test_an_older_ledger_charged_with_amplification_is_recharged_in_full():
    old = [[1.1, 0.1, 30]]  # (z, q, steps): what a device charged when cohorts counted as sampled
    ledger = PrivacyLedger(config(), old)
    assert ledger.rounds == 30
    assert ledger.epsilon() == pytest.approx(independent_epsilon(1.1, 30, 1e-5), rel=0.01)


def test_noise_for_a_target_epsilon_spends_it_over_the_rounds():
    z = noise_for_epsilon(8.0, 1e-5, 100)
    assert independent_epsilon(z, 100, 1e-5) == pytest.approx(8.0, rel=0.01)


def test_a_device_over_its_budget_is_told_why_and_its_history_survives_a_restart():
    ledger = PrivacyLedger(config(epsilon_budget=20.0))
    contributed = 0
    while ledger.over_budget_reason() is None:
        ledger.record_contribution()
        contributed += 1
    assert 0 < contributed < 1000
    assert ledger.epsilon() <= 20.0 < ledger.epsilon_after_next()
    assert "past the budget 20.0" in ledger.over_budget_reason()
    restored = PrivacyLedger(ledger.config, ledger.history)
    assert restored.epsilon() == ledger.epsilon() and restored.rounds == contributed


def test_clipping_bounds_the_norm_and_leaves_short_vectors_alone():
    long, norm = clip_l2(np.full(100, 1.0), 2.0)
    assert norm == pytest.approx(10.0) and np.linalg.norm(long) == pytest.approx(2.0)
    short = np.full(4, 0.1)
    assert np.array_equal(clip_l2(short, 2.0)[0], short)
    with pytest.raises(ValueError, match="NaN"):
        clip_l2(np.array([np.nan]), 1.0)


@pytest.mark.parametrize("mode, expected_std", [("distributed", 1.1 * 0.5 / math.sqrt(10)), ("local", 1.1 * 0.5)])
def test_each_device_adds_its_share_of_the_noise(mode, expected_std):
    cfg = config(clip_norm=0.5, mode=mode)
    assert cfg.device_noise_std == pytest.approx(expected_std)
    noised, _ = privatize(np.zeros(100_000), cfg, np.random.default_rng(0))
    assert noised.std() == pytest.approx(expected_std, rel=0.02)
    # the cohort's sum carries the configured noise z * clip_norm in distributed mode
    if mode == "distributed":
        total = sum(privatize(np.zeros(20_000), cfg, np.random.default_rng(i))[0] for i in range(10))
        assert total.std() == pytest.approx(1.1 * 0.5, rel=0.03)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": 10}, "missing keys"),
        ({"clip_norm": -1, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": 10, "cohort_size": 5}, "clip_norm"),
        ({"clip_norm": 1, "noise_multiplier": 1.0, "delta": 2.0, "fleet_size": 10, "cohort_size": 5}, "delta"),
        ({"clip_norm": 1, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": 4, "cohort_size": 5}, "exceeds"),
        (
            {"clip_norm": 1, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": 9, "cohort_size": 5, "mode": "x"},
            "mode",
        ),
        (
            {"clip_norm": 1, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": 9, "cohort_size": 5, "eps": 3},
            "unknown keys",
        ),
    ],
)
def test_malformed_dp_settings_are_refused_with_the_key_named(raw, message):
    with pytest.raises(PrivacyConfigError, match=message):
        DPConfig.from_dict(raw)
