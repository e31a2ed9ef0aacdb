"""The continual scenario: data that arrives over the rounds into a bounded sample store, an environment
that changes part-way, and the transfer metrics read from the in-process engine's round log."""

import dataclasses

import numpy as np
import pytest

from app_custom.nested.learner import SERVING_KINDS
from simulator.continual import ContinualSetup, ContinualStream, continual_metrics, run_continual
from simulator.inprocess import run_method_inprocess
from simulator.runner import Experiment

SMALL = ContinualSetup(
    "basic_motions", "sensor_shift", devices=2, rounds=6, seed=0, records_per_device=24, window_rounds=2
)


@pytest.fixture(scope="module")
def stream():
    return ContinualStream(SMALL)


def test_the_sample_store_holds_only_environment_1_before_the_change_and_only_environment_2_window_rounds_after(
    stream,
):
    change, held = SMALL.change, SMALL.window_rounds
    for device, timeline in enumerate(stream.timelines):
        for round_ in range(SMALL.rounds):
            window = stream.window_of(device, round_)
            assert 0 < len(window) <= stream.window
            environments = set(timeline.environment[window].tolist())
            if round_ < change:
                assert environments == {1}, round_
            elif round_ >= change + held - 1:
                assert environments == {2}, round_
            else:
                assert environments == {1, 2}, round_  # the old samples leave the store a round at a time
        assert len(stream.data_for(device, SMALL.rounds - 1).train) == stream.window


def test_a_device_is_tested_on_its_current_environment_and_starts_on_round_0s_store(stream):
    for device, timeline in enumerate(stream.timelines):
        assert stream.data_for(device, SMALL.change - 1).test is timeline.tests["env1"]
        assert stream.data_for(device, SMALL.change).test is timeline.tests["env2"]
        first = stream.fleet.devices[device].train
        assert np.array_equal(first.y, timeline.samples.y[stream.window_of(device, 0)])


def _affine_per_channel(before: np.ndarray, after: np.ndarray) -> list[tuple[float, float]]:
    """(gain, offset) of each channel if ``after`` is ``before`` through a per-channel gain and offset."""
    fits = []
    for channel in range(before.shape[1]):
        a, b = before[:, channel].ravel(), after[:, channel].ravel()
        (gain, offset), *_ = np.linalg.lstsq(np.stack([a, np.ones_like(a)], axis=1), b, rcond=None)
        np.testing.assert_allclose(gain * a + offset, b, atol=1e-4)
        fits.append((float(gain), float(offset)))
    return fits


def test_environment_2_reaches_each_device_through_new_sensors_of_its_own(stream):
    shifts = []
    for timeline in stream.timelines:
        env1, env2 = timeline.tests["env1"], timeline.tests["env2"]
        assert np.array_equal(env1.y, env2.y)  # the same recordings...
        shift = _affine_per_channel(env1.x, env2.x)  # ...through a new gain and offset per channel
        assert any(abs(gain - 1) > 0.05 or abs(offset) > 0.05 for gain, offset in shift)
        shifts.append(shift)
    assert not np.allclose(shifts[0], shifts[1])  # every device's new sensors are its own


def test_new_classes_appear_only_after_the_change():
    stream = ContinualStream(dataclasses.replace(SMALL, scenario="new_classes"))
    new = stream.new_classes
    assert 0 < len(new) < stream.fleet.num_classes
    for timeline in stream.timelines:
        before, after = timeline.environment == 1, timeline.environment == 2
        assert not np.isin(timeline.samples.y[before], new).any()
        assert np.isin(timeline.samples.y[after], new).any()
        assert not np.isin(timeline.tests["env1"].y, new).any()
        assert set(timeline.tests["env2"].y.tolist()) == set(range(stream.fleet.num_classes))


def test_a_change_round_outside_the_run_is_refused():
    with pytest.raises(ValueError, match="change_round"):
        ContinualSetup(rounds=4, change_round=4)
    with pytest.raises(ValueError, match="window_rounds"):
        ContinualSetup(rounds=4, window_rounds=3)


def test_transfer_metrics_read_the_log_at_the_change_and_at_the_end():
    # two devices, three rounds and the final merge, change at round 1: point 1 is the last before it
    env1 = [[0.1, 0.2], [0.6, 0.8], [0.5, 0.7], [0.4, 0.9]]
    env2 = [[0.0, 0.1], [0.2, 0.3], [0.5, 0.4], [0.9, 0.7]]
    serving = [(SERVING_KINDS.index("mix"), 0.25), (SERVING_KINDS.index("nested"), 0.0)]
    points = [
        {
            f"site-{d + 1}": {
                "acc_env1": env1[p][d],
                "acc_env2": env2[p][d],
                "serving_kind": float(serving[d][0]),
                "serving_personal_weight": serving[d][1],
            }
            for d in range(2)
        }
        for p in range(4)
    ]
    log = {"rounds": [{"devices": point} for point in points[:-1]], "final": points[-1]}
    metrics = continual_metrics(log, change=1)
    assert metrics["acc_env1_before_change"] == pytest.approx({"mean": 0.7, "worst": 0.6})
    assert metrics["backward_transfer"] == pytest.approx({"mean": -0.05, "worst": -0.2})  # 0.4-0.6, 0.9-0.8
    assert metrics["forward_transfer"] == pytest.approx({"mean": 0.45, "worst": 0.4})
    assert metrics["final_acc"] == metrics["acc_env2_final"] == pytest.approx({"mean": 0.8, "worst": 0.7})
    assert metrics["acc_over_time"]["current"] == pytest.approx([0.15, 0.7, 0.45, 0.8])
    assert metrics["final_serving"] == ["mix25", "nested"]


def test_a_short_run_reports_backward_transfer_as_the_final_less_the_before_change_accuracy(tmp_path, capsys):
    setup = dataclasses.replace(SMALL, rounds=4, window_rounds=1)
    report = run_continual(setup, tmp_path, methods=("fedavg",))
    metrics = report["methods"]["fedavg"]
    over_time = metrics["acc_over_time"]
    assert len(over_time["env1"]) == setup.rounds + 1
    assert metrics["acc_env1_before_change"]["mean"] == pytest.approx(over_time["env1"][setup.change])
    assert metrics["acc_env1_final"]["mean"] == pytest.approx(over_time["env1"][-1])
    assert metrics["backward_transfer"]["mean"] == pytest.approx(
        metrics["acc_env1_final"]["mean"] - metrics["acc_env1_before_change"]["mean"]
    )
    assert metrics["forward_transfer"]["mean"] == pytest.approx(over_time["env2"][setup.change + 1])
    assert report["setup"]["change_round"] == 2 and "fedavg" in capsys.readouterr().err


class _SameData:
    """A stream that gives every device the fleet's data in every round and scores nothing more."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.asked: list[tuple[int, int]] = []

    def data_for(self, device, round_):
        self.asked.append((device, round_))
        return self.fleet.devices[device]

    def test_sets(self, device):
        return {}


def test_a_stream_that_changes_nothing_leaves_the_round_log_as_without_a_stream(tmp_path):
    from app_custom.nested.device_data import load_fleet

    experiment = Experiment("basic_motions", "env_shift", devices=2, rounds=3, seed=0, engine="inprocess")
    data = experiment.data_spec()
    same = _SameData(load_fleet(data["fn"], data["kwargs"]))
    plain, sent = run_method_inprocess(experiment, "nested", tmp_path / "plain")
    streamed, streamed_sent = run_method_inprocess(experiment, "nested", tmp_path / "streamed", same)
    assert streamed == plain and streamed_sent == sent
    assert same.asked == [(device, round_) for round_ in (1, 2) for device in (0, 1)]
