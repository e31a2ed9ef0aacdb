"""Real FLARE simulator runs (SimEnv): what leaves a device, and what the server does with bad results."""

import contextlib
import json
from pathlib import Path

import pytest
from nvflare.recipe.sim_env import SimEnv

from app_custom.flare.job_builder import build_nested_job
from app_custom.flare.outbound_audit import AUDIT_FILE
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import load_fleet
from simulator.methods import method_config
from simulator.report import fast_values_sent, shared_shapes
from tests.flare.misbehaving_learners import FaultyLearner, LeakyLearner

pytestmark = pytest.mark.integration

CONFIG = method_config("nested")
DATA = {
    "fn": "simulator.fleets:make_fleet",
    "kwargs": {"dataset": "digits", "regime": "label_skew", "num_devices": 4, "seed": 0},
}
# the exact shared parameters, from the model's partition: independent of the guard's patterns
SHARED = shared_shapes(NestedConfig.from_dict(CONFIG), load_fleet(DATA["fn"], DATA["kwargs"]))


def _run(tmp_path: Path, name: str, rounds: int = 2, **job_args) -> Path:
    job = build_nested_job(name=name, config=CONFIG, data=DATA, num_rounds=rounds, min_clients=4, **job_args)
    SimEnv(num_clients=4, num_threads=4, workspace_root=str(tmp_path)).deploy(job)
    return tmp_path / name


def _audit(workspace: Path) -> list[dict]:
    records = []
    for path in sorted(workspace.glob(f"site-*/{AUDIT_FILE}")):
        records.extend(json.loads(line) for line in path.read_text().splitlines())
    return records


def _server_log(workspace: Path) -> dict:
    return json.loads((workspace / "server/simulate_job/global_versions/fleet_metrics.json").read_text())


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """One ordinary run of the nested job (3 rounds, 4 devices), shared by the tests that read it."""
    return _run(tmp_path_factory.mktemp("clean"), "clean", rounds=3)


def test_no_fast_layer_parameter_leaves_a_device(clean_run):
    workspace = clean_run
    audit = _audit(workspace)
    assert len(audit) == 4 * 4  # 3 training rounds and the final validation, 4 devices
    assert fast_values_sent(SHARED, audit) == 0
    trained = [r for r in audit if r["task"] == "train"]
    assert trained and all(r["params"] and r["return_code"] == "OK" for r in trained)
    # no raw sample either: only named scalar metrics and slow-layer tensors leave
    # (and what the device serves, and the held-out accuracy of each candidate it weighed)
    decision = {"serving_kind", "serving_personal_weight", "serving_kept", "holdout_samples"}
    accuracies = {"acc_after_merge", "acc_before_merge", "acc_naive_overwrite", "test_acc", "train_loss"}
    for record in audit:
        names = set(record["metrics"]) - decision - accuracies
        assert all(name.startswith("holdout_acc_") for name in names), record["metrics"]
    versions = sorted((workspace / "server/simulate_job/global_versions").glob("v*/meta.json"))
    assert len(versions) == 4  # the initial version and one candidate per round


def test_the_check_fails_when_the_guard_is_off_and_a_learner_leaks(tmp_path):
    workspace = _run(tmp_path, "leak_unguarded", rounds=1, guard=False, executor=LeakyLearner(config=CONFIG, data=DATA))
    assert fast_values_sent(SHARED, _audit(workspace)) > 0


def test_the_guard_stops_a_leaking_learner(tmp_path):
    # every result is refused, so the server has too few and the job ends in error; what left is still audited
    with contextlib.suppress(RuntimeError):
        _run(tmp_path, "leak_guarded", rounds=1, executor=LeakyLearner(config=CONFIG, data=DATA))
    workspace = tmp_path / "leak_guarded"
    audit = _audit(workspace)
    assert audit and fast_values_sent(SHARED, audit) == 0
    trained = [r for r in audit if r["task"] == "train"]
    assert trained and all(r["return_code"] == "TASK_RESULT_FILTER_ERROR" for r in trained)


def test_malformed_device_results_are_rejected_with_a_reason_and_the_run_continues(tmp_path):
    workspace = _run(tmp_path, "faulty", rounds=2, executor=FaultyLearner(config=CONFIG, data=DATA))
    log = _server_log(workspace)
    assert len(log["rounds"]) == 2 and log["final"]  # every round ran, and the final validation
    for entry in log["rounds"]:
        assert "NaN" in entry["rejected"]["site-1"]
        assert "shape" in entry["rejected"]["site-2"]
        assert "unknown keys" in entry["rejected"]["site-3"]
        assert "site-4" not in entry["rejected"]
        assert entry["status"] in ("accepted", "rejected")  # a candidate was built from site-4 alone


def test_overlapping_level_patterns_stop_the_job_with_an_error_that_names_the_parameters(tmp_path):
    overlapping = method_config("nested")
    overlapping["levels"][2]["patterns"] = ["*"]  # the slow level now also claims the adapters
    job = build_nested_job(name="overlap", config=overlapping, data=DATA, num_rounds=1, min_clients=4)
    with pytest.raises(RuntimeError):
        SimEnv(num_clients=4, num_threads=4, workspace_root=str(tmp_path)).deploy(job)
    logs = "".join(p.read_text() for p in (tmp_path / "overlap").glob("*/log.txt"))
    assert "parameters claimed by more than one level: adapters." in logs


def test_a_release_is_built_from_what_a_real_run_archived(clean_run, tmp_path):
    """The archive a FLARE run leaves describes its model (model.json): the OTA release builder needs
    nothing else, and the released graph reproduces the archived global version."""
    import numpy as np
    import onnxruntime as ort

    from ota.bundle import load_golden, read_manifest, verify_files
    from ota.release import build_release

    archive = clean_run / "server/simulate_job/global_versions"
    card = json.loads((archive / "model.json").read_text())
    assert card["input_spec"] == {"vision": [1, 8, 8]} and card["num_classes"] == 10
    assert sorted(card["shared_names"]) == sorted(SHARED)
    manifest = build_release(archive, tmp_path / "bundle", "jetson-orin-jp6")
    verify_files(tmp_path / "bundle", read_manifest(tmp_path / "bundle"))
    assert manifest["global_version"] == json.loads((archive / "current.json").read_text())["version"] >= 1
    inputs, expected = load_golden(tmp_path / "bundle", manifest)
    session = ort.InferenceSession(str(tmp_path / "bundle/model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], inputs)[0], expected, rtol=1e-3, atol=1e-4)
