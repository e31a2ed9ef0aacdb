"""Attack 3 (second half): a regional client that alters or invents the leaf sums it forwards.

A cluster-tier client sits between its leaves and the server and passes their sums up. With the
keys of a real ``fleetnest provision`` (FLARE's project root CA, each site's startup kit), the
attacker is region ``eu``: it raises a leaf's count or weight, scales its tensors, invents a sum
for a leaf that sent none (unsigned, signed with its own key, or with a sibling leaf's key), and
replays a leaf's genuine sum into another job. The defence holds when the cluster refuses each
with a logged reason and makes its version from the genuine sums only.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import yaml
from nvflare.apis.client import Client
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.edge.assessor import Assessment
from nvflare.fuel.utils.job_utils import build_client_hierarchy

from app_custom.cluster.leaf_sums import LeafSum
from app_custom.flare.fleet_assessor import NestedFleetAssessor
from app_custom.flare.fleet_messages import SiteSigner, leaf_sum_entry, report
from jobs.nested_fleet.job import settings as job_settings
from simulator.cli import main
from tests.provisioning.test_fleet import FLEET

JOB_ID = "job-3"
PROJECT = FLEET["project"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision_kits(tmp_path_factory.mktemp("fleet"))


def provision_kits(base):
    """The startup kits of a provisioned fleet: server, relay eu-relay, region eu, leaves eu-depot-1/2."""
    (base / "fleet.yaml").write_text(yaml.safe_dump(FLEET))
    assert main(["provision", "--fleet", str(base / "fleet.yaml"), "--workspace", str(base / "ws")]) == 0
    return sorted((base / "ws" / PROJECT).glob("prod_*"))[-1]


def _context(child: str | None = None, job_id: str = JOB_ID) -> FLContext:
    """The server's context for a report from ``child`` (its peer), with FLARE's client hierarchy."""
    clients = []
    for name, fqsn in (("eu", "eu"), ("eu-depot-1", "eu.eu-depot-1"), ("eu-depot-2", "eu.eu-depot-2")):
        client = Client(name, None)
        client.set_fqsn(fqsn)
        clients.append(client)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=True)
    fl_ctx.set_prop(FLContextKey.CLIENT_HIERARCHY, build_client_hierarchy(clients), private=True, sticky=True)
    if child is not None:
        peer = FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, child, private=False, sticky=True)
        fl_ctx.set_prop(ReservedKey.PEER_CTX, peer, private=False, sticky=True)
    return fl_ctx


@pytest.fixture
def cluster(kits, tmp_path):
    args = type("Args", (), {"devices": 8, "cohort": 3, "noise": 0.0})()
    assessor = NestedFleetAssessor(
        **job_settings(args),
        buffer_size=2,
        buffer_timeout=0.05,
        archive_dir=str(tmp_path / "archive"),
        project_ca=str(kits / "server" / "startup" / "rootCA.pem"),  # what the server's own kit holds
    )
    slow = assessor.start_task(_context())["slow"]
    return assessor, slow


def _sum(leaf: str, slow: dict, count: int = 3, scale: float = 0.01) -> LeafSum:
    total = {name: np.full(value.shape, scale * count, np.float32) for name, value in slow.items()}
    return LeafSum(leaf, 0, count, float(count), total)


def genuine_entry(kits, leaf: str, session: int, item: LeafSum, job_id: str = JOB_ID) -> dict:
    """What site ``leaf`` itself reports for ``session``: made the way its executor makes it, signed
    with the key of its startup kit."""
    signature = SiteSigner.from_startup(kits / leaf / "startup").sign(job_id, session, item)
    return leaf_sum_entry(session, item, signature)


def _forward(assessor, child: str, *entries, job_id: str = JOB_ID):
    return assessor.process_child_update(report(0, list(entries)), _context(child, job_id))


def _refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused a leaf sum" in r.getMessage()]


def _version_devices(assessor) -> int | None:
    time.sleep(0.06)
    assert assessor.assess(_context()) == Assessment.CONTINUE
    versions = [v for v in assessor.versions.archive.versions() if v.version > 0]
    return versions[-1].num_devices if versions else None


@pytest.mark.parametrize(
    "alter",
    [
        lambda e: e | {"count": 9, "weight": 9.0},
        lambda e: e | {"weight": e["weight"] * 0.5},
        lambda e: e | {"total": {k: v * 20 for k, v in e["total"].items()}},
        lambda e: e | {"total": {k: -v for k, v in e["total"].items()}},
        lambda e: e | {"base_version": 0, "session": e["session"] + 1},
    ],
    ids=["count", "weight", "scaled", "flipped", "session"],
)
def test_a_region_that_alters_a_leaf_sum_is_refused(kits, cluster, caplog, alter):
    assessor, slow = cluster
    caplog.set_level(logging.WARNING)
    genuine = genuine_entry(kits, "eu-depot-1", 11, _sum("eu-depot-1", slow))
    _forward(assessor, "eu", alter(genuine), genuine_entry(kits, "eu-depot-2", 21, _sum("eu-depot-2", slow)))
    assert any("eu-depot-1" in m and "signature" in m for m in _refusals(caplog)), _refusals(caplog)
    assert _version_devices(assessor) == 3, "the altered sum counted in the version"


def test_a_region_cannot_invent_a_sum_for_a_leaf(kits, cluster, caplog):
    assessor, slow = cluster
    caplog.set_level(logging.WARNING)
    invented = _sum("eu-depot-1", slow, count=40, scale=0.05)
    forged = genuine_entry(kits, "eu", 12, invented)  # signed with the region's own key
    forged["leaf"] = "eu-depot-1"
    sibling = genuine_entry(kits, "eu-depot-2", 13, invented)  # a sibling leaf's key
    sibling["leaf"] = "eu-depot-1"
    unsigned = leaf_sum_entry(14, invented)
    for entry in (forged, sibling, unsigned):
        _forward(assessor, "eu", entry)
    refused = _refusals(caplog)
    assert sum("eu-depot-1" in m for m in refused) >= 3, refused
    _forward(assessor, "eu", genuine_entry(kits, "eu-depot-2", 22, _sum("eu-depot-2", slow)))
    _forward(assessor, "eu", genuine_entry(kits, "eu-depot-1", 15, _sum("eu-depot-1", slow)))
    assert _version_devices(assessor) == 6, "an invented sum counted in the version"


def test_a_genuine_sum_is_refused_in_another_job_or_from_a_child_it_is_not_under(kits, cluster, caplog):
    assessor, slow = cluster
    caplog.set_level(logging.WARNING)
    genuine = genuine_entry(kits, "eu-depot-1", 16, _sum("eu-depot-1", slow), job_id="another-job")
    _forward(assessor, "eu", genuine)
    _forward(assessor, "eu-depot-2", genuine_entry(kits, "eu-depot-1", 17, _sum("eu-depot-1", slow)))
    refused = _refusals(caplog)
    assert any("eu-depot-1" in m and "signature" in m for m in refused), refused
    assert any("not one of its leaves" in m for m in refused), refused
    assert _version_devices(assessor) is None
