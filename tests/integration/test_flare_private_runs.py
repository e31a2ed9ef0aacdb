"""The private job in FLARE's simulator: only masked vectors leave, epsilon is accounted, bad
protocol messages are attributed, and a device over budget sits the round out."""

import json
import math
import re
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from nvflare.recipe.sim_env import SimEnv

from app_custom.flare.job_builder import build_nested_job
from app_custom.flare.outbound_audit import AUDIT_FILE
from simulator.report import fast_values_sent
from tests.flare.misbehaving_learners import SpentAndGarblingDevices
from tests.integration.test_flare_simulator_runs import CONFIG, DATA, SHARED

pytestmark = pytest.mark.integration

DP = {"clip_norm": 4.0, "noise_multiplier": 0.7, "delta": 1e-5, "fleet_size": 40, "cohort_size": 4}
PRIVACY = {"dp": DP, "ring_bits": 15}


def _run(tmp_path: Path, name: str, rounds: int = 2, privacy: dict = PRIVACY, clients: int = 4, **job_args) -> Path:
    data = DATA | {"kwargs": DATA["kwargs"] | {"num_devices": clients}}
    job = build_nested_job(
        name=name, config=CONFIG, data=data, num_rounds=rounds, min_clients=clients, privacy=privacy, **job_args
    )
    SimEnv(num_clients=clients, num_threads=clients, workspace_root=str(tmp_path)).deploy(job)
    return tmp_path / name


def _audit(workspace: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(workspace.glob(f"site-*/{AUDIT_FILE}"))
        for line in path.read_text().splitlines()
    ]


def _log(workspace: Path) -> dict:
    return json.loads((workspace / "server/simulate_job/global_versions/fleet_metrics.json").read_text())


def independent_epsilon(rounds: int) -> float:
    """dp-accounting on what happened: every device took part in every round (the flat job asks
    them all), so each round is a Gaussian of the job's multiplier, no sampling, no amplification."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(DP["noise_multiplier"]), rounds)
    return accountant.get_epsilon(DP["delta"])


def test_with_privacy_on_only_masked_vectors_leave_and_epsilon_matches_an_independent_accountant(tmp_path):
    workspace = _run(tmp_path, "private", rounds=2)
    audit = _audit(workspace)
    assert fast_values_sent(SHARED, audit, update_extra=1) == 0
    masked = [r["secagg"] for r in audit if r.get("secagg", {}).get("type") == "MaskedInput"]
    assert len(masked) == 2 * 4
    values = sum(math.prod(shape) for shape in SHARED.values())
    # the slow delta and the device's (masked) sample weight; nothing else
    assert all(m["length"] == values + 1 and m["ring_bits"] == 15 for m in masked)
    assert fast_values_sent(SHARED, audit) == len(masked)  # the check counts what it is not told about
    # nothing but protocol messages and scalars: no float array leaves any device
    for record in audit:
        assert set(record["params"]) <= {"__secagg_message__"}, record
    log = _log(workspace)
    for entry in log["rounds"]:
        assert entry["secagg"]["survivors"] == ["site-1", "site-2", "site-3", "site-4"]
        assert entry["secagg"]["rejections"] == []
        assert entry["status"] in ("accepted", "rejected")
    for round_, entry in enumerate(log["rounds"], start=1):
        assert entry["dp"]["accounting"].endswith("no amplification by sampling")
        assert "discrete Gaussian" in entry["dp"]["mechanism"]
        for metrics in entry["devices"].values():
            assert metrics["dp_delta"] == DP["delta"]
            assert metrics["dp_epsilon"] == pytest.approx(independent_epsilon(round_), rel=0.01)
    versions = sorted((workspace / "server/simulate_job/global_versions").glob("v*/meta.json"))
    assert len(versions) == 3  # the initial version and one candidate per round, archived like the plain job's
    # nothing measured on a device's data in its log either (the aggregator's operators read client logs)
    logs = [path.read_text() for path in workspace.glob("site-*/**/log*.txt")]
    assert logs and not any(re.search(r"norm \d|before clipping|test_acc|acc_after_merge", text) for text in logs)


def test_a_device_over_its_budget_sends_nothing_a_garbled_message_is_attributed_and_the_round_goes_on(tmp_path):
    # one FLARE run for two faults (the suite's time): of five devices, site-1 has spent its budget
    # and site-2 answers the share stage with garbage; the three others finish the round
    privacy = {"dp": DP | {"cohort_size": 5, "epsilon_budget": 10.0, "min_cohort": 3}, "device_metrics": False}
    data = DATA | {"kwargs": DATA["kwargs"] | {"num_devices": 5}}
    executor = SpentAndGarblingDevices(config=CONFIG, data=data, privacy=privacy)
    workspace = _run(tmp_path, "spent", rounds=1, privacy=privacy, clients=5, executor=executor, guard=False)
    entry = _log(workspace)["rounds"][0]
    assert "past the budget 10.0" in entry["dp_skipped"]["site-1"]
    rejections = entry["secagg"]["rejections"]
    assert [(r["sender"], r["stage"]) for r in rejections] == [("site-2", "share")]
    assert entry["secagg"]["survivors"] == ["site-3", "site-4", "site-5"]
    assert entry["status"] in ("accepted", "rejected")
    spent = [r for r in _audit(workspace) if r["site"] == "site-1" and r["task"] == "train"]
    assert spent and all(r["params"] == {} for r in spent)  # no advert, no vector
    # with device_metrics off, nothing computed on a device's data leaves it but what DP accounts for
    trained = [r for r in _audit(workspace) if r["task"] in ("train", "validate")]
    assert {r["task"] for r in trained} == {"train", "validate"}
    assert all(set(r["metrics"]) <= {"dp_epsilon", "dp_delta", "dp_rounds", "dp_contributed"} for r in trained)


def test_local_dp_without_secure_aggregation_sends_fully_noised_deltas_of_shared_layers_only(tmp_path):
    privacy = {"dp": DP | {"mode": "local"}, "secure_aggregation": False}
    workspace = _run(tmp_path, "local_dp", rounds=1, privacy=privacy)
    audit = _audit(workspace)
    assert fast_values_sent(SHARED, audit) == 0
    trained = [r for r in audit if r["task"] == "train"]
    assert len(trained) == 4 and all(set(r["params"]) == set(SHARED) for r in trained)
    entry = _log(workspace)["rounds"][0]
    assert entry["status"] in ("accepted", "rejected") and entry["rejected"] == {}
    for metrics in entry["devices"].values():
        assert metrics["dp_epsilon"] == pytest.approx(independent_epsilon(1), rel=0.01)
