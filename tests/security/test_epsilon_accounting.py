"""Attack 5: epsilon undercounted by claiming amplification for cohorts nobody sampled.

The flat job asks every device every round and a leaf fills its cohort first come, first served:
neither draws a cohort at random in a way its aggregator cannot steer, so no round may be charged
at a sampling rate below 1. Each test replays what a device takes part in and compares what its
ledger reports with dp-accounting on exactly that participation.
"""

from __future__ import annotations

import argparse
import logging
import math
import re

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from app_custom.privacy import discrete_gaussian
from app_custom.privacy.dp import PrivacyLedger
from app_custom.privacy.private_update import PrivacySettings
from simulator.privacy_options import add_privacy_arguments, privacy_of


def spent(z: float, rounds: int, delta: float) -> float:
    """dp-accounting: a Gaussian of multiplier ``z`` in each of ``rounds`` rounds, nothing sampled."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def test_the_readmes_target_epsilon_is_what_eight_devices_spend_in_every_round():
    parser = argparse.ArgumentParser()
    add_privacy_arguments(parser)
    args = parser.parse_args(["--dp-epsilon", "8", "--fleet-size", "1000", "--secure-agg"])
    privacy = PrivacySettings.from_dict(privacy_of(args, devices=8, rounds=8))
    ledger = PrivacyLedger(privacy.dp)
    for _ in range(8):  # the flat job: all 8 devices in all 8 rounds
        ledger.record_contribution()
    assert ledger.epsilon() == pytest.approx(spent(privacy.dp.noise_multiplier, 8, privacy.dp.delta), rel=0.01)
    assert ledger.epsilon() <= 8.0 * 1.01  # was 63 with the fleet of 1000 counted as sampling


def test_a_leaf_device_in_100_sessions_is_charged_for_100_unamplified_rounds():
    dp = {"clip_norm": 8.0, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": 8, "cohort_size": 3}
    ledger = PrivacyLedger(PrivacySettings.from_dict({"dp": dp}).dp)
    for _ in range(100):
        ledger.record_contribution()
    assert ledger.epsilon() == pytest.approx(spent(1.0, 100, 1e-5), rel=0.01)
    assert ledger.epsilon() > 90  # 96.1 spent; the amplified ledger said 31.2


def test_the_discrete_gaussians_charge_covers_the_sum_it_releases():
    """Kairouz et al.'s bound for the sum actually released is below what a round is charged."""
    settings = PrivacySettings.from_dict(
        {"dp": {"clip_norm": 8.0, "noise_multiplier": 0.5, "delta": 1e-5, "fleet_size": 8, "cohort_size": 4}}
    )
    for length in (10, 15_050):
        ring = settings.ring(4, length)
        sigma = settings.noise_sigma(ring.scale, length)
        sensitivity = discrete_gaussian.rounded_l2_bound(settings.dp.clip_norm * ring.scale, length)
        contributors = settings.dp.contributors_assumed
        rho = discrete_gaussian.sum_rho(sensitivity, sigma, contributors, length)
        assert rho <= discrete_gaussian.round_rho(0.5) * (1 + 1e-9)
        assert rho == pytest.approx(1 / (2 * 0.5**2), rel=1e-6)


def test_the_noise_a_device_draws_is_the_discrete_gaussian_it_is_charged_for():
    noise = discrete_gaussian.sample(7.0, 200_000)
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < 0.1 and noise.std() == pytest.approx(7.0, rel=0.01)
    assert math.isclose(discrete_gaussian.round_rho(2.0), 1 / 8, rel_tol=1e-12)


def test_a_hierarchy_devices_epsilon_is_its_own_participation_in_authenticated_sessions(tmp_path, caplog):
    """Real fleet devices (certificates from a real device CA) in three authenticated leaf
    sessions of a cohort of 3 out of 4: each device's reported epsilon is dp-accounting's for the
    sessions in which the leaf took its masked vector, and nothing for the others."""
    from app_custom.cluster.leaf_cohort import MASK, LeafCohort
    from app_custom.privacy.peer_certificates import CertificateAuthority
    from edge_runtime.fleet_device import DeviceIdentity, FleetDevice, PeerKeys
    from jobs.nested_fleet.job import settings as job_settings
    from provisioning.identities import DeviceCA

    caplog.set_level(logging.INFO)
    job = job_settings(argparse.Namespace(devices=8, cohort=3, noise=0.5))
    ca = DeviceCA.create(tmp_path / "ca", "epsilon-test")
    ca_pem, crl_pem = (ca.dir / "ca.pem").read_bytes(), (ca.dir / "crl.pem").read_bytes()
    devices = {}
    for i in range(4):
        issued = ca.issue(f"robot-{i}", valid_days=30)
        identity = tmp_path / f"id{i}"
        identity.mkdir()
        (identity / "device.key").write_bytes(issued.key_pem)
        (identity / "device.crt").write_bytes(issued.cert_pem)
        peers = PeerKeys(DeviceIdentity(identity), ca_pem)
        devices[issued.device_id] = FleetDevice(
            issued.device_id, job["config"], job["data"], job["privacy"], i, tmp_path / f"d{i}", peers=peers
        )
    weights = devices["robot-0"].learner.initial_slow()
    settings = PrivacySettings.from_dict(job["privacy"])
    contributed = dict.fromkeys(devices, 0)
    for session, enrolled in enumerate((["robot-0", "robot-1", "robot-2"], ["robot-1", "robot-2", "robot-3"]) * 2):
        leaf = LeafCohort(
            job_id="job-1",
            leaf="eu-depot-1",
            session=session + 1,
            base_version=0,
            settings=settings,
            shapes={name: value.shape for name, value in weights.items()},
            cohort_size=3,
            min_devices=2,
            stage_timeout=60,
            authority=CertificateAuthority(ca_pem, crl_pem),
            crl_pem=crl_pem,
        )
        for name in enrolled:
            leaf.task_for(name)
        stages = set()
        while not leaf.done:
            for name in enrolled:
                task = leaf.task_for(name)
                if task is None:
                    continue
                stages.add(task.stage)
                answer = weights if task.stage == "train" else None
                message, _, _ = devices[name].answer(task.stage, task.spec, 0, answer, task.message)
                leaf.submit(name, task.stage, message)
        assert leaf.failure is None and "consistency" in stages
        for name in leaf.aggregator._stages[MASK].accepted:
            contributed[name] += 1
    assert contributed == {"robot-0": 2, "robot-1": 4, "robot-2": 4, "robot-3": 2}
    for name, device in devices.items():
        expected = spent(settings.dp.noise_multiplier, contributed[name], settings.dp.delta)
        assert device.ledger.epsilon() == pytest.approx(expected, rel=0.01)
    # and nothing measured on a device's data went to its log (attack 10)
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "trained from version" in logged and not re.search(r"acc|loss|norm", logged)
