"""The committed job folder is exactly what job.py exports, and its components validate their arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app_custom.flare.job_builder import sorted_task_lists
from app_custom.flare.learner_executor import NestedLearnerExecutor
from app_custom.flare.nested_controller import NestedFedAvg
from app_custom.nested.config import ConfigError
from simulator.methods import method_config

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "nested_fedavg"


def test_committed_job_folder_matches_a_fresh_export(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(JOB / "job.py"), "--export", "--export-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = tmp_path / "nested_fedavg"
    for name in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json"):
        fresh_config, committed = json.loads((fresh / name).read_text()), json.loads((JOB / name).read_text())
        assert sorted_task_lists(fresh_config) == sorted_task_lists(committed), name
    assert (fresh / "app/custom/app_custom/flare/learner_executor.py").exists()


def test_components_reject_malformed_arguments_in_their_constructors():
    data = {"fn": "simulator.fleets:make_fleet", "kwargs": {}}
    with pytest.raises(ConfigError, match="levels"):
        NestedLearnerExecutor(config={"levels": "all"}, data=data)
    with pytest.raises(ValueError, match="data must be"):
        NestedLearnerExecutor(config=method_config("nested"), data={"function": "x"})
    with pytest.raises(ValueError, match="num_rounds"):
        NestedFedAvg(config=method_config("nested"), data=data, num_rounds=0)
    with pytest.raises(ValueError, match="server_lr"):
        NestedFedAvg(config=method_config("nested"), data=data, server_lr=-1.0)
