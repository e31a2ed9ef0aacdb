"""The cluster's assessor at its trust boundary: leaf sums with the wrong fields, count, shape or
values are refused with a log line naming the leaf and the reason, a resent sum is counted once,
and well-formed sums make a version through the same gate and archive as the flat job. Every sum
is signed by its leaf with the key of its startup kit from a real ``nvflare provision`` (the
refusal of unsigned, altered and invented sums: tests/security/test_hierarchy_leaf_sums.py)."""

from __future__ import annotations

import json
import logging
import re
import time

import numpy as np
import pytest
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.edge.assessor import Assessment

from app_custom.cluster.leaf_sums import LeafSum
from app_custom.flare.fleet_assessor import NestedFleetAssessor
from app_custom.flare.fleet_messages import SiteSigner, leaf_sum_entry, report
from jobs.nested_fleet.job import settings as job_settings
from tests.security.test_hierarchy_leaf_sums import provision_kits

JOB_ID = "job-1"
SIGNERS: dict = {}


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_kits(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(autouse=True)
def signers(kits):
    SIGNERS.update({leaf: SiteSigner.from_startup(kits / leaf / "startup") for leaf in ("eu-depot-1", "eu-depot-2")})
    SIGNERS["ca"] = str(kits / "server" / "startup" / "rootCA.pem")


def _context() -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=False, sticky=True)
    return fl_ctx


@pytest.fixture
def assessor(tmp_path):
    args = type("Args", (), {"devices": 8, "cohort": 3, "noise": 0.0})()
    common = job_settings(args)
    assessor = NestedFleetAssessor(
        **common, buffer_size=2, buffer_timeout=0.05, archive_dir=str(tmp_path / "archive"), project_ca=SIGNERS["ca"]
    )
    task = assessor.start_task(FLContext())
    assert task["global_version"] == 0
    return assessor, task["slow"]


def _entry(leaf, slow, session=1, count=3, scale=0.01, base_version=0, change=None):
    """What ``leaf`` reports, signed by it. ``change``: odd values the leaf itself sent (and signed),
    except a wrong type of leaf name or an extra field, which are refused before any signature."""
    total = {name: np.full(value.shape, scale * count, np.float32) for name, value in slow.items()}
    change = dict(change or {})
    unsigned = {k: change.pop(k) for k in ("leaf", "extra") if k in change}
    fields = {"count": count, "weight": float(count), "total": total} | change
    item = LeafSum(leaf, base_version, fields["count"], float(fields["weight"]), fields["total"])
    return leaf_sum_entry(session, item, SIGNERS[leaf].sign(JOB_ID, session, item)) | unsigned


def _send(assessor, *entries):
    return assessor.process_child_update(report(0, list(entries)), _context())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda slow: {"count": 0}, "count must be a positive integer"),
        (lambda slow: {"count": 5000}, "exceeds the registered cohort size"),
        (lambda slow: {"weight": 7.0}, "weight 7.0 is outside"),
        (lambda slow: {"total": {k: np.zeros((3, 3), np.float32) for k in slow}}, "shape"),
        (lambda slow: {"total": {"not.a.layer": np.zeros(3, np.float32)}}, "unknown keys"),
        (lambda slow: {"total": {k: np.full(v.shape, np.nan, np.float32) for k, v in slow.items()}}, "NaN|finite"),
        (lambda slow: {"total": {k: np.full(v.shape, 50.0, np.float32) for k, v in slow.items()}}, "past the"),
        (lambda slow: {"leaf": 7}, "leaf must be a site name"),
        (lambda slow: {"extra": 1}, "exactly the fields"),
    ],
)
def test_a_malformed_leaf_sum_is_refused_with_a_log_line_and_nothing_breaks(assessor, caplog, change, reason):
    assessor, slow = assessor
    caplog.set_level(logging.WARNING)
    _send(assessor, _entry("eu-depot-1", slow, change=change(slow)))  # a leaf that signs what it sends
    _send(assessor, _entry("eu-depot-2", slow))  # a good leaf beside it
    time.sleep(0.06)
    assert assessor.assess(FLContext()) == Assessment.CONTINUE
    refused = [r.getMessage() for r in caplog.records if "refused a leaf sum" in r.getMessage()]
    assert any(re.search(reason, m) for m in refused), refused
    (version,) = [v for v in assessor.versions.archive.versions() if v.version > 0]
    assert version.num_devices == 3  # the good leaf's sum alone
    log = json.loads((assessor.versions.archive.root / "fleet_versions.json").read_text())
    assert any(re.search(reason, r["reason"]) for r in log["refused"]), "the refusal is kept with the version log"


def test_well_formed_sums_make_a_version_and_a_resent_sum_counts_once(assessor):
    assessor, slow = assessor
    accepted, reply = _send(assessor, _entry("eu-depot-1", slow))
    assert accepted and reply["global_version"] == 0 and reply["acknowledged"] == [["eu-depot-1", 1]]
    _, reply = _send(assessor, _entry("eu-depot-1", slow))  # the same (leaf, session) again: a resent report
    assert reply["acknowledged"] == [["eu-depot-1", 1]]  # acknowledged, so the leaf stops resending it
    _send(assessor, _entry("eu-depot-2", slow))
    assessor.assess(FLContext())
    versions = assessor.versions.archive.versions()
    assert [v.version for v in versions] == [0, 1] and versions[1].num_devices == 6
    time.sleep(0.06)
    assessor.assess(FLContext())  # had the resent sum been kept, it would make a version now
    assert [v.version for v in assessor.versions.archive.versions()] == [0, 1]
    _, reply = _send(assessor, _entry("eu-depot-1", slow, session=2))
    assert reply["global_version"] == 1 and set(reply["slow"]) == set(slow)  # the child was behind


def test_sync_mode_ends_the_round_with_each_version_and_the_workflow_at_max_rounds(tmp_path):
    args = type("Args", (), {"devices": 8, "cohort": 3, "noise": 0.0})()
    common = job_settings(args)
    assessor = NestedFleetAssessor(
        **common,
        mode="sync",
        num_versions=5,
        max_rounds=2,
        buffer_size=1,
        archive_dir=str(tmp_path / "a"),
        project_ca=SIGNERS["ca"],
    )
    slow = assessor.start_task(FLContext())["slow"]
    assert assessor.assess(FLContext()) == Assessment.CONTINUE  # nothing reported yet
    _send(assessor, _entry("eu-depot-1", slow))
    assert assessor.assess(FLContext()) == Assessment.TASK_DONE
    assessor.end_task(FLContext())
    task = assessor.start_task(FLContext())
    _send(assessor, _entry("eu-depot-1", task["slow"], session=2, base_version=task["global_version"]))
    assert assessor.assess(FLContext()) == Assessment.WORKFLOW_DONE  # two rounds of at most two
    resumed = NestedFleetAssessor(**common, mode="sync", archive_dir=str(tmp_path / "a"), project_ca=SIGNERS["ca"])
    assert resumed.start_task(FLContext())["global_version"] == assessor.versions.version
