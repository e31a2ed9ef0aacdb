"""`fleetnest simulate` end to end through FLARE's simulator, with a data set defined outside the repository."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FLEETNEST = str(Path(sys.executable).with_name("fleetnest"))

PLUGIN = textwrap.dedent(
    '''
    import numpy as np

    def three_sensors():
        """Three devices with 5-d feature vectors; each device's classes depend on its own offset."""
        devices = []
        for k in range(3):
            rng = np.random.default_rng(k)
            x = rng.normal(size=(60, 5)).astype(np.float32)
            y = ((x[:, 0] + 0.5 * k) > 0).astype(np.int64)
            devices.append({"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]})
        return devices
    '''
)


def test_a_dataset_plugin_from_outside_the_repository_runs_through_flare(tmp_path):
    (tmp_path / "my_sensor_data.py").write_text(PLUGIN)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            FLEETNEST,
            "simulate",
            "--dataset",
            "my_sensor_data:three_sensors",
            "--rounds",
            "2",
            "--methods",
            "nested",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"nested"}
    for summary in report["methods"].values():
        assert len(summary["per_device_acc"]) == 3
        assert all(0.0 <= a <= 1.0 for a in summary["per_device_acc"])
    assert report["fast_params_sent"] == 0
    assert report["bytes_per_update"] > 0
    # one merge per device and round after the first: every one is in the drop distribution
    after_merge = report["forgetting"]["after_merge"]
    assert after_merge["merges"] == len(report["forgetting"]["drops_after_merge"]) == 3 * 2
    assert after_merge["max"] == report["forgetting"]["max_drop_after_merge"]
    choices = report["methods"]["nested"]["per_device_choice"]  # what each device serves, and why
    assert len(choices) == 3
    for choice in choices:
        assert choice["serves"] in {"nested", "shared", "finetune", "personal", "mix"}
        assert choice["holdout_samples"] > 0 and set(choice["holdout_acc"]) >= {"shared", "nested", "personal"}
    assert (out / "per_device_accuracy.png").stat().st_size > 0
    assert "round 2/2" in proc.stderr  # progress is shown while it runs


def test_a_broken_plugin_gets_a_clear_error(tmp_path):
    (tmp_path / "broken_data.py").write_text("import numpy as np\ndef fleet():\n    return [{'x_train': 1}]\n")
    proc = subprocess.run(
        [FLEETNEST, "simulate", "--dataset", "broken_data:fleet", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "device 0: missing ['y_train', 'x_test', 'y_test']" in proc.stderr


def test_simulate_with_dp_and_secure_aggregation_reports_accuracy_and_epsilon(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [FLEETNEST, "simulate", "--devices", "4", "--rounds", "2", "--methods", "nested"]
        + ["--dp-epsilon", "8", "--secure-agg", "--fleet-size", "40", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["secure_aggregation"] is True
    assert report["privacy"]["dp"]["noise_multiplier"] > 0
    nested = report["methods"]["nested"]
    assert 0.0 <= nested["mean_acc"] <= 1.0
    privacy = nested["privacy"]
    assert privacy["delta"] == 1e-5
    assert len(privacy["epsilon_per_device_per_round"]) == 2
    assert 0 < privacy["final_epsilon_max"] <= 8.0  # the noise was chosen for epsilon 8 after all rounds
    assert privacy["secure_aggregation"]["survivors_per_round"] == [4, 4]
    assert report["fast_params_sent"] == 0
    assert 0 < report["bytes_per_update"] < 0.5 * 4 * 17866 * 1.2


def test_bad_privacy_options_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run(
        [FLEETNEST, "simulate", "--secure-agg", "--dp-mode", "local", "--ring-bits", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "ring" in proc.stderr
