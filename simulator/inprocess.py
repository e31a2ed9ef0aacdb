"""The flat nested workflow in one process, for benchmarks that run hundreds of jobs.

Each round every device merges the current global version, trains and hands back its slow delta;
the cluster's ``GlobalVersions`` (the same aggregator, gate and archive as the FLARE controller
``NestedFedAvg``) makes, judges and archives the next version. The devices are the same
``NestedLearner`` objects the FLARE executor drives, and the round log has the controller's form,
so one report reads both. What FLARE adds, and this leaves out, is the transport: messages,
filters (the fast-layer guard), timeouts, secure aggregation and DP. A run with privacy settings
goes through FLARE. ``tests/simulator/test_inprocess.py`` shows both engines give the same
accuracies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from app_custom.cluster.aggregation import SlowDeltaAggregator
from app_custom.cluster.gate import ValidationGate
from app_custom.cluster.versions import GlobalVersions
from app_custom.flare.fast_layer_guard import RESULT_KEYS
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import load_fleet
from app_custom.nested.learner import NestedLearner

from .methods import method_config


def run_method_inprocess(experiment, method: str, out: Path) -> tuple[dict, list[dict]]:
    """One method over ``experiment``'s fleet: (the controller's round log, what each device sent)."""
    if experiment.privacy:
        raise ValueError("the in-process engine runs no DP or secure aggregation: use the FLARE engine")
    torch.set_num_threads(1)
    data = experiment.data_spec()
    fleet = load_fleet(data["fn"], data["kwargs"])
    config = method_config(method, experiment.seed)
    nested = NestedConfig.from_dict(config)
    num_classes = nested.model.num_classes or fleet.num_classes
    archive = Path(out) / "inprocess" / method
    shutil.rmtree(archive, ignore_errors=True)
    aggregator = SlowDeltaAggregator()
    versions = GlobalVersions(config, fleet.cluster_validation, num_classes, archive, aggregator, ValidationGate())
    learners = {
        f"site-{i + 1}": NestedLearner(nested, device, num_classes, device_seed=i)
        for i, device in enumerate(fleet.devices)
    }
    log: dict = {"rounds": [], "final": {}}
    sent: list[dict] = []
    for round_ in range(experiment.rounds):
        aggregator.reset()
        devices = {}
        for site, learner in learners.items():
            merge = learner.receive_global(versions.current, versions.version)
            outcome = learner.train_round()
            devices[site] = merge.metrics() | outcome.metrics
            sent.append(
                {
                    "site": site,
                    "task": "train",
                    "round": round_,
                    "keys": sorted(RESULT_KEYS),
                    "params": {name: list(value.shape) for name, value in outcome.slow_delta.items()},
                }
            )
            aggregator.add(site, outcome.slow_delta, outcome.num_samples, versions.expected)
        entry = {"round": round_, "devices": devices}
        entry["rejected"] = {r.contributor: r.reason for r in aggregator.rejections}
        if aggregator.count:
            record = versions.propose(round_).record
            entry.update(version=record.version, status=record.status, probe=record.metrics)
        else:
            entry.update(version=versions.version, status="unchanged")
        log["rounds"].append(entry)
    for site, learner in learners.items():
        merge = learner.receive_global(versions.current, versions.version)
        log["final"][site] = merge.metrics() | {"test_acc": merge.acc_after}
    log["final_version"] = versions.version
    return log, sent
