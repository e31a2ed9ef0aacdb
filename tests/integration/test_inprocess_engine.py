"""The in-process engine the benchmarks use runs the same learners and cluster code as FLARE's
simulator: on the same fleet and seed both give the same versions, choices and accuracies."""

import dataclasses

import pytest

from simulator.inprocess import run_method_inprocess
from simulator.runner import Experiment, read_method, run_method

pytestmark = pytest.mark.integration


def test_the_in_process_engine_gives_what_the_flare_simulator_gives(tmp_path):
    experiment = Experiment("digits", "label_skew", devices=3, rounds=2, seed=0, methods=("nested",))
    (tmp_path / "flare").mkdir()
    run_method(experiment, "nested", tmp_path / "flare")
    flare, _ = read_method(tmp_path / "flare", "nested")
    inprocess, sent = run_method_inprocess(dataclasses.replace(experiment, engine="inprocess"), "nested", tmp_path)
    assert [r["status"] for r in inprocess["rounds"]] == [r["status"] for r in flare["rounds"]]
    assert set(inprocess["final"]) == set(flare["final"]) == {"site-1", "site-2", "site-3"}
    for site, metrics in flare["final"].items():
        mine = inprocess["final"][site]
        assert mine["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6), site
        assert mine["serving_kind"] == metrics["serving_kind"], site
        for name in (k for k in metrics if k.startswith("holdout_acc_")):
            assert mine[name] == pytest.approx(metrics[name], abs=1e-6), (site, name)
    assert len(sent) == 3 * 2 and all(set(s["params"]) and s["task"] == "train" for s in sent)


def test_the_in_process_engine_refuses_privacy_settings(tmp_path):
    experiment = Experiment(engine="inprocess", privacy={"dp_mode": "local"})
    with pytest.raises(ValueError, match="use the FLARE engine"):
        run_method_inprocess(experiment, "nested", tmp_path)
