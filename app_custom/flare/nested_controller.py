"""The flat nested workflow: the server plays leaf and cluster.

Each round: send the current global slow version, collect slow deltas, combine them
(``SlowDeltaAggregator``: malformed updates are rejected with a logged reason, the round goes
on), score the candidate on the cluster's validation data, let the ``ValidationGate`` decide,
and archive the candidate as accepted (it becomes current) or rejected (the previous version
stays). After the last round a ``validate`` task collects each device's accuracy on the final
version. A restarted server resumes from the archive's current version.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from app_custom.cluster.aggregation import SlowDeltaAggregator
from app_custom.cluster.gate import ValidationGate
from app_custom.cluster.versions import GlobalVersions
from app_custom.durable import write_bytes_atomic
from app_custom.flare.learner_executor import TRAIN_TASK, VALIDATE_TASK, check_data_spec
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import load_fleet

METRICS_FILE = "fleet_metrics.json"


class NestedFedAvg(ModelController):
    def __init__(
        self,
        config: dict,
        data: dict,
        num_rounds: int = 5,
        min_clients: int = 2,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        max_acc_drop: float = 0.05,
        max_loss_rise: float = 0.25,
        archive_dir: str = "global_versions",
        final_validation: bool = True,
        task_timeout: int = 0,
    ) -> None:
        """Args:
        config: the nested learning configuration shared with the devices (JSON mapping).
        data: ``{"fn": ..., "kwargs": ...}``; the server uses only the cluster's validation set.
        num_rounds: rounds to run (a resumed run counts the rounds already archived).
        min_clients: results needed per round; fewer aborts the round's task.
        server_lr, server_momentum: the server optimiser over the mean slow delta.
        max_acc_drop, max_loss_rise: the validation gate's tolerances on the cluster probe; a
            candidate is rejected when it exceeds one and the change is significant (p < 0.05).
        archive_dir: version archive, relative to the job's run directory unless absolute.
        """
        super().__init__(persistor_id="", ignore_result_error=None, task_check_period=0.1)
        if not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"num_rounds must be a positive integer, got {num_rounds!r}")
        if not isinstance(min_clients, int) or min_clients < 1:
            raise ValueError(f"min_clients must be a positive integer, got {min_clients!r}")
        if not isinstance(archive_dir, str) or not archive_dir:
            raise ValueError(f"archive_dir must be a non-empty string, got {archive_dir!r}")
        # FLARE's job export reads constructor arguments back from same-named attributes
        self.config = config
        self.nested = NestedConfig.from_dict(config)
        self.data = check_data_spec(data)
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.max_acc_drop = max_acc_drop
        self.max_loss_rise = max_loss_rise
        self.aggregator = SlowDeltaAggregator(server_lr, server_momentum)
        self.gate = ValidationGate(max_acc_drop, max_loss_rise)
        self.archive_dir = archive_dir
        self.final_validation = final_validation
        self.task_timeout = task_timeout

    def _archive_root(self) -> Path:
        if os.path.isabs(self.archive_dir):
            return Path(self.archive_dir)
        workspace = self.fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        return Path(workspace.get_run_dir(self.fl_ctx.get_job_id())) / self.archive_dir

    def run(self) -> None:
        fleet = load_fleet(self.data["fn"], self.data.get("kwargs", {}))
        versions = GlobalVersions(
            self.config,
            fleet.cluster_validation,
            self.nested.model.num_classes or fleet.num_classes,
            self._archive_root(),
            self.aggregator,
            self.gate,
        )
        start_round = versions.next_round() if versions.resumed else 0
        if versions.resumed:
            self.info(f"resuming from archived global version {versions.version}, at round {start_round}")
        log = self._read_log() if versions.resumed else {"rounds": [], "final": {}}

        for round_ in range(start_round, self.num_rounds):
            if self.abort_signal.triggered:
                return
            self.aggregator.reset()
            entry = {"round": round_} | self._collect_round(
                round_, versions.current, versions.version, versions.expected
            )
            entry["rejected"] = {r.contributor: r.reason for r in self.aggregator.rejections}
            if self.aggregator.count and versions.expected:
                proposal = versions.propose(round_)
                new = proposal.record
                self.info(f"round {round_}: version {new.version} {new.status}: {new.reason}")
                entry.update(version=new.version, status=new.status, probe=new.metrics)
            else:
                entry.update(version=versions.version, status="unchanged")
            log["rounds"].append(entry)
            self._write_log(log)
        current, record = versions.current, versions.record

        if self.final_validation:
            results = self.send_model_and_wait(
                task_name=VALIDATE_TASK,
                data=self._global_model(current, record.version, self.num_rounds),
                min_responses=self.min_clients,
                timeout=self.task_timeout,
            )
            log["final"] = {r.meta.get("client_name", "?"): dict(r.metrics or {}) for r in results}
            log["final_version"] = record.version
            self._write_log(log)

    def _collect_round(self, round_: int, current: dict, version: int, expected: dict) -> dict:
        """Send the current version out for training and feed the returned slow deltas to the
        aggregator; returns the round's log fields (at least ``devices``: metrics per device)."""
        results = self.send_model_and_wait(
            task_name=TRAIN_TASK,
            data=self._global_model(current, version, round_),
            min_responses=self.min_clients,
            timeout=self.task_timeout,
        )
        device_metrics = {}
        for result in sorted(results, key=lambda r: r.meta.get("client_name", "")):
            device = result.meta.get("client_name", "?")
            device_metrics[device] = dict(result.metrics or {})
            weight = result.meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
            if result.params_type != ParamsType.DIFF:
                rejection = self.aggregator.reject(device, f"params_type must be DIFF, got {result.params_type}")
                self.warning(f"round {round_}: rejected update from {device}: {rejection.reason}")
                continue
            rejection = self.aggregator.add(device, result.params or {}, weight, expected)
            if rejection:
                self.warning(f"round {round_}: rejected update from {device}: {rejection.reason}")
        return {"devices": device_metrics}

    def _global_model(self, slow: dict[str, np.ndarray], version: int, round_: int) -> FLModel:
        return FLModel(
            params_type=ParamsType.FULL,
            params=slow,
            current_round=round_,
            total_rounds=self.num_rounds,
            meta={"global_version": version},
        )

    def _read_log(self) -> dict:
        path = self._archive_root() / METRICS_FILE
        if not path.exists():
            return {"rounds": [], "final": {}}
        return {"rounds": json.loads(path.read_text()).get("rounds", []), "final": {}}

    def _write_log(self, log: dict) -> None:
        path = self._archive_root() / METRICS_FILE
        write_bytes_atomic(path, json.dumps(log | {"updated_at": time.time()}, indent=2, default=float).encode())
