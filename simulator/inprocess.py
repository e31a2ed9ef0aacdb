"""The flat nested workflow in one process, for benchmarks that run hundreds of jobs.

Each round every device merges the current global version, trains and hands back its slow delta;
the cluster's ``GlobalVersions`` (the same aggregator, gate and archive as the FLARE controller
``NestedFedAvg``) makes, judges and archives the next version. The devices are the same
``NestedLearner`` objects the FLARE executor drives, and the round log has the controller's form,
so one report reads both. What FLARE adds, and this leaves out, is the transport: messages,
filters (the fast-layer guard), timeouts, secure aggregation and DP. A run with privacy settings
goes through FLARE. ``tests/integration/test_inprocess_engine.py`` shows both engines give the same
accuracies.

With a ``DeviceStream`` the devices' data changes between rounds (``simulator.continual``): in each
round a device merges the new version (deciding on the samples it held until then), is given its
data for the round and trains on it. After every merge, the final one included, the model it serves
is scored on the stream's named test sets (``acc_<name>`` beside its other metrics in the round log):
the score at round r's merge is that of the model served after r rounds of data.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from app_custom.cluster.aggregation import SlowDeltaAggregator
from app_custom.cluster.gate import ValidationGate
from app_custom.cluster.versions import GlobalVersions
from app_custom.flare.fast_layer_guard import RESULT_KEYS
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import DeviceData, FleetData, LabelledSet, load_fleet
from app_custom.nested.learner import NestedLearner, evaluate

from .methods import method_config


class DeviceStream(Protocol):
    """Devices whose data changes as the rounds go: ``fleet`` holds every device's data for round 0,
    the cluster's validation set and the classes."""

    fleet: FleetData

    def data_for(self, device: int, round_: int) -> DeviceData:
        """What device ``device`` (its index in ``fleet``) holds in round ``round_``: it trains on it in
        that round and decides on it at the next merge."""
        ...

    def test_sets(self, device: int) -> Mapping[str, LabelledSet]:
        """The named test sets device ``device``'s served model is scored on after every merge."""
        ...


def _scores(learner: NestedLearner, stream: DeviceStream | None, device: int) -> dict[str, float]:
    """The accuracy of the model ``learner`` serves on each of the stream's test sets of ``device``."""
    if stream is None:
        return {}
    return {f"acc_{name}": evaluate(learner.served, test)[0] for name, test in stream.test_sets(device).items()}


def run_method_inprocess(
    experiment, method: str, out: Path, stream: DeviceStream | None = None
) -> tuple[dict, list[dict]]:
    """One method over ``experiment``'s fleet, or over ``stream``'s devices as their data changes:
    (the controller's round log, what each device sent)."""
    if experiment.privacy:
        raise ValueError("the in-process engine runs no DP or secure aggregation: use the FLARE engine")
    torch.set_num_threads(1)
    if stream is None:
        data = experiment.data_spec()
        fleet = load_fleet(data["fn"], data["kwargs"])
    else:
        fleet = stream.fleet
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
        for i, (site, learner) in enumerate(learners.items()):
            merge = learner.receive_global(versions.current, versions.version)
            served = _scores(learner, stream, i)  # what the device serves through this round
            if stream is not None and round_ > 0:  # round 0's data is the fleet's, which the learner started on
                learner.use_data(stream.data_for(i, round_))
            outcome = learner.train_round()
            devices[site] = merge.metrics() | outcome.metrics | served
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
    for i, (site, learner) in enumerate(learners.items()):
        merge = learner.receive_global(versions.current, versions.version)
        log["final"][site] = merge.metrics() | {"test_acc": merge.acc_after} | _scores(learner, stream, i)
    log["final_version"] = versions.version
    return log, sent
