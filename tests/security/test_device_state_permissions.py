"""Attack: a standalone fleet device (``python -m edge_runtime.fleet_device``, no systemd ``UMask=``)
writes its learner state and its privacy ledger with whatever umask it was started under, so under
the common 022 any local user reads the device's model (fit to its own data) and its DP spending.
Both files must be owner-only whatever the umask."""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from edge_runtime.fleet_device import LEDGER_FILE, STATE_FILE, FleetDevice
from jobs.nested_fleet.job import settings as job_settings


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_fleet_devices_state_and_ledger_are_owner_only_under_umask_022(tmp_path, umask_022):
    job = job_settings(argparse.Namespace(devices=8, cohort=3, noise=0.05))
    device = FleetDevice("robot-0", job["config"], job["data"], job["privacy"], 0, tmp_path / "state")
    device.persist()  # what a train step does after training
    device._charge()  # what the mask stage does before the masked vector leaves
    modes = {name: stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) for name in (STATE_FILE, LEDGER_FILE)}
    assert modes == {STATE_FILE: 0o600, LEDGER_FILE: 0o600}
