import json

import numpy as np
import pytest

from app_custom.cluster.archive import ACCEPTED, REJECTED, ArchiveError, VersionArchive, VersionRecord
from app_custom.cluster.gate import ValidationGate


def _weights(value):
    return {"trunk.0.weight": np.full((2, 2), value, np.float32)}


def test_versions_keep_metrics_lineage_and_only_accepted_ones_become_current(tmp_path):
    archive = VersionArchive(tmp_path)
    archive.save(_weights(0), VersionRecord(0, ACCEPTED, None, None, 0, {"val_acc": 0.5}))
    archive.save(_weights(1), VersionRecord(1, ACCEPTED, 0, 0, 8, {"val_acc": 0.6}))
    archive.save(_weights(2), VersionRecord(2, REJECTED, 1, 1, 7, {"val_acc": 0.2}, "worse"))
    assert archive.current_version() == 1
    weights, record = archive.load(1)
    np.testing.assert_array_equal(weights["trunk.0.weight"], _weights(1)["trunk.0.weight"])
    assert (record.parent, record.num_devices, record.metrics) == (0, 8, {"val_acc": 0.6})
    assert [r.status for r in archive.versions()] == [ACCEPTED, ACCEPTED, REJECTED]
    assert archive.next_version() == 3


def test_tampered_weights_are_detected(tmp_path):
    archive = VersionArchive(tmp_path)
    archive.save(_weights(1), VersionRecord(0, ACCEPTED, None, None, 0))
    meta = tmp_path / "v000000" / "meta.json"
    record = json.loads(meta.read_text())
    record["sha256"] = "0" * 64
    meta.write_text(json.dumps(record))
    with pytest.raises(ArchiveError, match="sha256"):
        archive.load(0)


def test_a_version_is_never_overwritten_and_temporaries_are_cleaned(tmp_path):
    archive = VersionArchive(tmp_path)
    archive.save(_weights(1), VersionRecord(0, ACCEPTED, None, None, 0))
    with pytest.raises(ArchiveError, match="already exists"):
        archive.save(_weights(2), VersionRecord(0, ACCEPTED, None, None, 0))
    (tmp_path / ".tmp-v000001").mkdir()  # a crash mid-write
    VersionArchive(tmp_path)
    assert not (tmp_path / ".tmp-v000001").exists()


def _scores(correct, loss, groups=None):
    from app_custom.cluster.gate import Scores

    return Scores(np.array(correct, dtype=bool), np.array(loss, dtype=np.float64), groups)


def test_gate_rejects_a_significant_regression_past_the_tolerance():
    gate = ValidationGate(max_acc_drop=0.02, max_loss_rise=0.1)
    n = 100
    current = _scores([True] * 80 + [False] * 20, [0.5] * n)
    # a 10-point drop: 10 samples lost, none gained (McNemar p ~ 0.001)
    verdict = gate.assess(_scores([True] * 70 + [False] * 30, [0.5] * n), current)
    assert not verdict.accepted and "accuracy drops" in verdict.reason
    # three samples lost (past the 2-point tolerance, McNemar p = 0.125) and 0.4 more loss on every
    # sample: the significant loss rise confirms the accuracy drop
    verdict = gate.assess(_scores([True] * 77 + [False] * 23, [0.9] * n), current)
    assert not verdict.accepted and "loss rises" in verdict.reason
    # one sample lost (within the tolerance) and the same loss rise: a confidence change, accepted
    verdict = gate.assess(_scores([True] * 79 + [False] * 21, [0.9] * n), current)
    assert verdict.accepted, verdict.reason
    # the same loss rise at unchanged accuracy: more confident where right and where wrong
    verdict = gate.assess(_scores([True] * 80 + [False] * 20, [0.9] * n), current)
    assert verdict.accepted, verdict.reason
    assert not gate.assess(_scores([True] * 80 + [False] * 20, [0.5] * 99 + [float("nan")]), current).accepted
    # more accurate and more confident at once (early training): a loss rise alone does not reject
    verdict = gate.assess(_scores([True] * 90 + [False] * 10, [0.9] * n), current)
    assert verdict.accepted, verdict.reason
    # against the untrained initial version there is no reference: only finiteness counts
    assert gate.assess(_scores([False] * n, [2.3] * n), None).accepted
    assert not gate.assess(_scores([False] * n, [float("inf")] * n), None).accepted


def test_gate_accepts_a_drop_that_chance_explains_on_a_small_validation_set():
    gate = ValidationGate(max_acc_drop=0.02, max_loss_rise=0.1)
    current = _scores([True] * 30 + [False] * 10, [0.5] * 40)
    # 4 points (2 of 40 samples): lost 3, gained 1 -> p = 0.31, within chance
    candidate = _scores([False] * 3 + [True] * 27 + [True] + [False] * 9, [0.5] * 40)
    verdict = gate.assess(candidate, current)
    assert verdict.accepted, verdict.reason
    # a loss rise carried by one outlier sample is not significant either
    verdict = gate.assess(_scores([True] * 30 + [False] * 10, [0.5] * 39 + [8.0]), current)
    assert verdict.accepted, verdict.reason
    # the same 4-point drop on 1000 samples (lost 60, gained 20) is real and is rejected
    big_current = _scores([True] * 750 + [False] * 250, [0.5] * 1000)
    big_candidate = _scores([False] * 60 + [True] * 690 + [True] * 20 + [False] * 230, [0.5] * 1000)
    assert not gate.assess(big_candidate, big_current).accepted
    with pytest.raises(ValueError, match="different validation sets"):
        gate.assess(_scores([True] * 10, [0.1] * 10), current)


def test_gate_counts_a_recording_once_not_once_per_window():
    """8 recordings of 6 windows each: two recordings flipping all their windows is 12 windows lost,
    which counted per window is overwhelming (McNemar p < 0.001) but is two recordings of eight."""
    gate = ValidationGate(max_acc_drop=0.05, max_loss_rise=0.25)
    groups = np.repeat(np.arange(8), 6)
    current = _scores([True] * 48, [0.3] * 48, groups)
    candidate = _scores([False] * 12 + [True] * 36, [0.3] * 12 + [0.3] * 36, groups)
    assert not gate.assess(_scores(candidate.correct, candidate.loss), _scores(current.correct, current.loss)).accepted
    verdict = gate.assess(candidate, current)
    assert verdict.accepted, verdict.reason
    # six recordings of eight lost: a regression whichever unit is counted
    candidate = _scores([False] * 36 + [True] * 12, [2.0] * 36 + [0.3] * 12, groups)
    assert not gate.assess(candidate, current).accepted


def test_the_probe_halves_never_split_a_recording():
    from app_custom.cluster.gate import SlowLayerValidator
    from app_custom.nested.config import NestedConfig
    from simulator.fleets import make_fleet
    from simulator.methods import method_config

    fleet = make_fleet("basic_motions", "label_skew", 4, seed=0)
    validation = fleet.cluster_validation
    assert validation.groups is not None and len(np.unique(validation.groups)) < len(validation)
    validator = SlowLayerValidator(NestedConfig.from_dict(method_config("fedrep")), validation, fleet.num_classes)
    assert not set(validator._fit.groups) & set(validator._eval.groups)
    initial = {n: p.detach().numpy().copy() for n, p in validator.model.named_parameters()}
    scores = validator.score({n: initial[n] for n in validator.shared_names})
    assert sorted(scores.groups.tolist()) == sorted(validation.groups.tolist())


def test_the_cluster_scores_the_shared_model_directly_when_it_holds_the_head_else_by_a_probe():
    from app_custom.cluster.gate import SlowLayerValidator
    from app_custom.nested.config import NestedConfig
    from simulator.fleets import make_fleet
    from simulator.methods import method_config

    fleet = make_fleet("digits", "label_skew", 4, seed=0)
    for method, direct in (("nested", True), ("fedavg", True), ("fedrep", False)):
        validator = SlowLayerValidator(NestedConfig.from_dict(method_config(method)), fleet.cluster_validation, 10)
        assert validator.whole_model is direct, method
        initial = {n: p.detach().numpy().copy() for n, p in validator.model.named_parameters()}
        scores = validator.score({n: initial[n] for n in validator.shared_names})
        assert scores.correct.shape == scores.loss.shape == (len(fleet.cluster_validation),)
        metrics = scores.summary()
        assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["val_loss"] > 0


def test_reopening_after_a_crash_between_version_and_pointer_makes_the_newest_accepted_current(tmp_path):
    archive = VersionArchive(tmp_path)
    archive.save(_weights(0), VersionRecord(0, ACCEPTED, None, None, 0))
    archive.save(_weights(1), VersionRecord(1, ACCEPTED, 0, 0, 4), server_state={"trunk.0.weight": np.ones((2, 2))})
    archive.save(_weights(2), VersionRecord(2, REJECTED, 1, 1, 4))
    (tmp_path / "current.json").write_text(json.dumps({"version": 0}))  # the pointer write was lost
    reopened = VersionArchive(tmp_path)
    assert reopened.current_version() == 1
    assert reopened.last_round() == 1  # a resumed server starts after the rejected round too
    np.testing.assert_array_equal(reopened.load_server_state(1)["trunk.0.weight"], np.ones((2, 2)))
    assert reopened.load_server_state(2) is None


def test_the_model_card_names_what_the_weights_belong_to_and_refuses_another_model(tmp_path):
    from app_custom.cluster.archive import ArchiveError

    archive = VersionArchive(tmp_path)
    card = {
        "config": {"model": {"width": 64}, "seed": 0},
        "input_spec": {"imu": (6, 50)},
        "num_classes": 4,
        "shared_names": ["head.bias"],
    }
    archive.write_model_card(card)
    assert VersionArchive(tmp_path).model_card()["input_spec"] == {"imu": [6, 50]}
    archive.write_model_card(card | {"config": {"model": {"width": 64}, "seed": 1}})  # a training setting
    assert archive.model_card()["config"]["seed"] == 1
    with pytest.raises(ArchiveError, match="another model"):
        archive.write_model_card(card | {"num_classes": 5})
    with pytest.raises(ArchiveError, match="another model"):
        archive.write_model_card(card | {"config": {"model": {"width": 32}}})
    assert archive.model_card()["num_classes"] == 4
