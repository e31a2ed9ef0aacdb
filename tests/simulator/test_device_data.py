import re

import numpy as np
import pytest

from app_custom.nested.device_data import DataError, fleet_from_devices, import_function
from simulator.fleets import make_fleet


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
    ],
)
def test_plugin_data_errors_name_the_device_and_array(change, message):
    devices = [_device(), {**_device(), **change}]
    with pytest.raises(DataError, match=f"device 1 .*{re.escape(message)}"):
        fleet_from_devices(devices)


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
