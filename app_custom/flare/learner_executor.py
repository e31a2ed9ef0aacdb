"""The device learner as a FLARE ``Executor``.

It receives the global slow layers (``FLModel``, FULL), merges them with the device's own fast
layers, trains, and returns only the slow delta (``FLModel``, ``params_type=DIFF``). All
device-local state stays in this object and in its state file between rounds, so the same
executor serves unchanged as the learner of FLARE's ``HierarchicalUpdateGatherer``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import load_fleet
from app_custom.nested.learner import IncompatibleState, NestedLearner
from app_custom.nested.slow_delta import UpdateError

TRAIN_TASK = "train"
VALIDATE_TASK = "validate"
STATE_FILE = "fleetnest_device_state.pt"


def device_index(site_name: str) -> int:
    """``site-3`` -> 2: simulated devices are numbered from 1 in FLARE's site names."""
    match = re.fullmatch(r".*?(\d+)", site_name)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"cannot derive a device index from site name {site_name!r} (expected e.g. 'site-1')")
    return int(match.group(1)) - 1


def check_data_spec(data: Any) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("fn"), str):
        raise ValueError(f"data must be {{'fn': 'package.module:function', 'kwargs': {{...}}}}, got {data!r}")
    unknown = set(data) - {"fn", "kwargs"}
    if unknown:
        raise ValueError(f"data: unknown keys {sorted(unknown)}")
    if not isinstance(data.get("kwargs", {}), dict):
        raise ValueError(f"data.kwargs must be a mapping, got {data.get('kwargs')!r}")
    return data


class NestedLearnerExecutor(Executor):
    def __init__(
        self,
        config: dict,
        data: dict,
        train_task: str = TRAIN_TASK,
        validate_task: str = VALIDATE_TASK,
        persist_state: bool = True,
        torch_threads: int = 1,
    ) -> None:
        """Args:
        config: the nested learning configuration (see ``NestedConfig``), as a JSON mapping.
        data: ``{"fn": "package.module:function", "kwargs": {...}}`` giving the fleet's data;
            this device takes the entry of its own index.
        persist_state: save the device-local state after every task under the site's workspace.
        torch_threads: intra-op threads for this device's training (0 = torch's default); simulated
            devices share the host's cores, so one each avoids oversubscription.
        """
        super().__init__()
        self.config = config  # FLARE's job export reads constructor arguments back from attributes
        self.nested = NestedConfig.from_dict(config)
        self.data = check_data_spec(data)
        self.train_task = train_task
        self.validate_task = validate_task
        self.persist_state = persist_state
        self.torch_threads = torch_threads
        self.learner: NestedLearner | None = None
        self._state_path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            try:
                self._start(fl_ctx)
            except Exception as e:
                self.system_panic(f"cannot set up the nested learner: {e}", fl_ctx)

    def _start(self, fl_ctx: FLContext) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        site = fl_ctx.get_identity_name()
        fleet = load_fleet(self.data["fn"], self.data.get("kwargs", {}))
        index = device_index(site)
        if index >= len(fleet.devices):
            raise ValueError(f"site {site} is device {index}, but the fleet has only {len(fleet.devices)} devices")
        num_classes = self.nested.model.num_classes or fleet.num_classes
        self.learner = NestedLearner(self.nested, fleet.devices[index], num_classes, device_seed=index)
        if self.persist_state:
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            root = Path(workspace.get_root_dir()) if workspace else Path.cwd()
            self._state_path = root / STATE_FILE
            if self._state_path.exists():
                try:
                    self.learner.load(self._state_path)
                    self.log_info(fl_ctx, f"resumed device state from {self._state_path}")
                except IncompatibleState as e:
                    # keep the old state (it holds this device's personal layers), start afresh beside it
                    kept = self._state_path.with_suffix(f".{int(time.time())}.incompatible")
                    self._state_path.rename(kept)
                    self.log_warning(fl_ctx, f"{e}; kept it as {kept} and started a fresh device state")

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.learner is None:
            self.log_error(fl_ctx, "nested learner is not set up")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if task_name not in (self.train_task, self.validate_task):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            incoming = FLModelUtils.from_shareable(shareable)
            if incoming.params_type != ParamsType.FULL:
                raise ValueError(f"global slow weights must be FULL, got {incoming.params_type}")
            version = (incoming.meta or {}).get("global_version")
            # checks keys, shapes and finiteness before anything of the device's model changes
            merge = self.learner.receive_global(incoming.params or {}, version)
        except (UpdateError, ValueError, TypeError) as e:
            self.log_error(fl_ctx, f"rejecting task {task_name}: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        metrics = merge.metrics()
        meta: dict[str, Any] = {"global_version": version}
        if task_name == self.validate_task:
            metrics["test_acc"] = merge.acc_after
            result = FLModel(params_type=ParamsType.FULL, params={}, metrics=metrics, meta=meta)
        else:
            try:
                outcome = self.learner.train_round(should_stop=lambda: abort_signal.triggered)
            except FloatingPointError as e:
                self.log_error(fl_ctx, f"local training diverged: {e}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            metrics.update(outcome.metrics)
            meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = outcome.num_samples
            result = FLModel(
                params_type=ParamsType.DIFF,
                params=outcome.slow_delta,
                metrics=metrics,
                meta=meta,
                current_round=incoming.current_round,
            )
        if self._state_path is not None:
            self.learner.save(self._state_path)
        return FLModelUtils.to_shareable(result)
