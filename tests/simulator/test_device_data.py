import re

import numpy as np
import pytest

from app_custom.nested.device_data import DataError, fleet_from_devices, import_function
from simulator.datasets import load
from simulator.fleets import _drawn_splits, make_fleet


def _device(n=20, d=4):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(n, d)).astype(np.float32),
        "y_train": rng.integers(0, 3, n).astype(np.int64),
        "x_test": rng.normal(size=(n, d)).astype(np.float32),
        "y_test": rng.integers(0, 3, n).astype(np.int64),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x_train": None}, "expected a numpy array"),
        ({"y_train": np.zeros(20, np.float32)}, "int64"),
        ({"y_test": np.zeros(5, np.int64)}, "20 samples in x but 5 labels"),
        ({"x_train": np.full((20, 4), np.nan, np.float32)}, "NaN"),
        ({"x_train": np.zeros((20, 4), np.int32)}, "float32"),
        ({"x_train": np.zeros((0, 4), np.float32), "y_train": np.zeros(0, np.int64)}, "train: no samples"),
        ({"x_test": np.zeros((20, 4, 1, 1, 1), np.float32)}, "test.x: expected shape"),
        ({"groups_train": np.zeros(3)}, "train.groups: expected one group id per sample"),
    ],
)
def test_plugin_data_errors_name_the_device_and_array(change, message):
    devices = [_device(), {**_device(), **change}]
    with pytest.raises(DataError, match=f"device 1 .*{re.escape(message)}"):
        fleet_from_devices(devices)


def test_a_mistyped_key_is_named():
    with pytest.raises(DataError, match=re.escape("device 1: unknown key(s) ['x_trian']")):
        fleet_from_devices([_device(), {**_device(), "x_trian": np.zeros((20, 4), np.float32)}])


def test_devices_must_agree_on_the_sample_shape():
    with pytest.raises(DataError, match="differs from device 0"):
        fleet_from_devices([_device(d=4), _device(d=5)])


def test_plugin_spec_errors_are_clear():
    with pytest.raises(DataError, match="package.module:function"):
        import_function("no_colon")
    with pytest.raises(DataError, match="cannot import"):
        import_function("no_such_module_xyz:f")
    with pytest.raises(DataError, match="no callable"):
        import_function("json:no_such_function")


def test_shipped_fleets_are_non_iid_and_deterministic():
    a = make_fleet("digits", "label_skew", 6, seed=1)
    b = make_fleet("digits", "label_skew", 6, seed=1)
    assert len(a.devices) == 6
    np.testing.assert_array_equal(a.devices[2].train.y, b.devices[2].train.y)
    dominant = [np.bincount(d.train.y, minlength=10).max() / len(d.train.y) for d in a.devices]
    assert np.mean(dominant) > 0.3  # a device sees a few classes mostly
    scarce = make_fleet("basic_motions", "scarce", 4, seed=0)
    assert all(len(d.train) <= 16 for d in scarce.devices)
    shifted = make_fleet("robot", "env_shift", 4, seed=0)
    assert set(shifted.devices[0].train.x) == {"vision", "imu"}


def test_a_fleet_built_by_the_function_itself_is_checked_too():
    from dataclasses import replace

    from app_custom.nested.device_data import LabelledSet, check_fleet

    fleet = fleet_from_devices([_device(), _device()])
    assert check_fleet(fleet).num_classes == fleet.num_classes
    with pytest.raises(DataError, match=r"device 1 test.y: label 7 >= num_classes 3"):
        bad = replace(fleet.devices[1], test=LabelledSet(fleet.devices[1].test.x, np.full(20, 7, np.int64)))
        check_fleet(replace(fleet, devices=(fleet.devices[0], bad), num_classes=3))
    with pytest.raises(DataError, match="cluster validation.x: contains NaN"):
        cluster = fleet.cluster_validation
        check_fleet(replace(fleet, cluster_validation=LabelledSet(np.full_like(cluster.x, np.nan), cluster.y)))
    with pytest.raises(DataError, match="num_classes must be an integer >= 2"):
        check_fleet(replace(fleet, num_classes=1))


def test_each_device_is_tested_on_its_own_distribution_drawn_from_the_held_out_pool():
    skew = make_fleet("digits", "label_skew", 6, seed=1)
    pool = skew.devices[0].test
    train_bytes = {x.tobytes() for d in skew.devices for x in d.train.x}
    assert not any(x.tobytes() in train_bytes for x in pool.x)  # nobody trains on a test sample
    for device in skew.devices:
        np.testing.assert_array_equal(device.test.y, pool.y)  # one pool, weighted per device
        mix = np.bincount(device.train.y, minlength=10) / len(device.train)
        weighted = np.bincount(device.test.y, weights=device.test.weight, minlength=10) / device.test.weight.sum()
        # the weighted pool has the device's label mix (train and test share it up to the split)
        assert np.abs(weighted - mix).sum() < 0.5
        assert device.test.effective_size > 50
    shifted = make_fleet("digits", "env_shift", 4, seed=0)
    a, b = shifted.devices[0], shifted.devices[1]
    assert a.test.weight is None and len(a.test) == len(b.test) > 4 * len(a.train) * 0.3
    assert not np.allclose(a.test.x, b.test.x)  # the same recordings through each owner's sensors

    def background(x):  # a blank pixel (0 in the raw digits) becomes the owner's sensor offset
        values, counts = np.unique(x, return_counts=True)
        return values[counts.argmax()]

    # a device's test samples go through the same sensors as its training samples
    assert background(a.train.x) == background(a.test.x) != background(b.test.x)
    raw = make_fleet("digits", "scarce", 4, seed=0).devices[0].test
    assert raw.weight is None and raw.effective_size == len(raw)


def test_weighted_test_sets_are_validated_and_weight_the_accuracy():
    import torch

    from app_custom.nested.device_data import LabelledSet, check_fleet
    from app_custom.nested.learner import evaluate

    class Constant(torch.nn.Module):  # always predicts class 0
        def forward(self, x):
            return torch.tensor([[5.0, 0.0]]).repeat(len(x), 1)

    x, y = np.zeros((4, 3), np.float32), np.array([0, 0, 1, 1])
    assert evaluate(Constant(), LabelledSet(x, y))[0] == 0.5
    assert evaluate(Constant(), LabelledSet(x, y, np.array([3.0, 3.0, 1.0, 1.0])))[0] == 0.75
    assert LabelledSet(x, y, np.array([1.0, 1.0, 0.0, 0.0])).effective_size == 2.0
    from dataclasses import replace

    fleet = fleet_from_devices([_device(), _device()])
    for weight, message in [(np.ones(3), "one weight per sample"), (-np.ones(20), ">= 0"), (np.zeros(20), "not all 0")]:
        bad = replace(fleet.devices[0], test=LabelledSet(fleet.devices[0].test.x, fleet.devices[0].test.y, weight))
        with pytest.raises(DataError, match=f"device 0 test.weight: .*{message}"):
            check_fleet(replace(fleet, devices=(bad, fleet.devices[1])))


def test_the_drop_distribution_counts_gains_and_the_tail():
    from simulator.report import drop_distribution

    assert drop_distribution([]) is None
    summary = drop_distribution([-0.02, -0.01, 0.0, 0.005, 0.02] * 4)
    assert summary["merges"] == 20 and summary["share_gain"] == 0.4
    assert summary["share_drop_over_1pt"] == 0.2 and summary["max"] == 0.02 and summary["median"] == 0.0


def test_a_fleet_larger_than_the_data_draws_overlapping_training_recordings_and_never_tests_on_them():
    data = load("digits")
    rng = np.random.default_rng(0)
    rest = np.arange(len(data.y))
    splits = _drawn_splits(data, rest, 200, 40, "env_shift", rng)
    trained = set(np.concatenate([train for train, _, _ in splits]).tolist())
    tested = set(splits[0][1].tolist())
    assert all(len(np.unique(data.groups[train])) == 40 for train, _, _ in splits)
    assert all(np.array_equal(test, splits[0][1]) for _, test, _ in splits)
    assert not trained & tested  # no device is tested on a recording any device trained on
    assert len(trained) < 200 * 40  # recordings overlap across devices

    fleet = make_fleet("digits", "env_shift", num_devices=200, seed=0, records_per_device=40)
    assert [len(d.train.y) for d in fleet.devices] == [40] * 200
    assert np.array_equal(fleet.devices[0].test.y, fleet.devices[1].test.y)
    assert not np.allclose(fleet.devices[0].test.x, fleet.devices[1].test.x)  # each through its own sensors
    with pytest.raises(ValueError, match="IID recordings"):
        make_fleet("digits", "label_skew", num_devices=20, records_per_device=10)
    with pytest.raises(ValueError, match="exceeds"):
        make_fleet("digits", "env_shift", num_devices=2, records_per_device=5000)
