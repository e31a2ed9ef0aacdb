"""The device learner with DP and secure aggregation, as a FLARE ``Executor``.

The ``train`` task trains exactly as ``NestedLearnerExecutor`` does; then, instead of the slow
delta, the device answers with its secure-aggregation key advert. Its delta is clipped, noised
and quantized on the device and leaves it only masked, in the ``secagg_mask`` stage. A device
whose next contribution would take it past its epsilon budget trains (its fast layers keep
learning) but answers with its reason and no advert. Without secure aggregation (``dp.mode``
``local``) the train result is the fully noised delta itself.

Every protocol message travels as one uint8 array under ``SECAGG_KEY``; ``FastLayerGuard``
lets through only that array, and only when it decodes as a device-to-aggregator message.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from app_custom.durable import write_json_atomic
from app_custom.egress import SECAGG_KEY
from app_custom.flare.learner_executor import TRAIN_TASK, VALIDATE_TASK, NestedLearnerExecutor
from app_custom.privacy.device_round import DeviceRound
from app_custom.privacy.dp import PrivacyLedger, privatize
from app_custom.privacy.private_update import PrivacySettings, flatten, session_params, unflatten
from app_custom.privacy.quantization import QuantizationError
from app_custom.privacy.secagg import MASK, SHARE, UNMASK, ProtocolError, SecAggParams
from app_custom.privacy.wire import WireError, encode_message

SHARE_TASK, MASK_TASK, UNMASK_TASK = "secagg_share", "secagg_mask", "secagg_unmask"
SECAGG_TASKS = (SHARE_TASK, MASK_TASK, UNMASK_TASK)
STAGE_OF_TASK = {SHARE_TASK: SHARE, MASK_TASK: MASK, UNMASK_TASK: UNMASK}
LEDGER_FILE = "fleetnest_privacy_ledger.json"
SESSION_FILE = "fleetnest_secagg_session.json"


def as_message_array(message: object) -> np.ndarray:
    return np.frombuffer(encode_message(message), dtype=np.uint8).copy()


def message_bytes(params: dict | None) -> bytes:
    value = (params or {}).get(SECAGG_KEY)
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise WireError(f"expected a uint8 array under {SECAGG_KEY!r}")
    return value.tobytes()


def secagg_params(settings: PrivacySettings, spec: dict, length: int) -> tuple[SecAggParams, tuple[str, ...]]:
    """The round's protocol parameters from the ``secagg`` entry the aggregator sends with the model."""
    params = session_params(settings, spec, length)
    return params, tuple(spec["cohort"])


class PrivateLearnerExecutor(NestedLearnerExecutor):
    def __init__(
        self,
        config: dict,
        data: dict,
        privacy: dict,
        train_task: str = TRAIN_TASK,
        validate_task: str = VALIDATE_TASK,
        persist_state: bool = True,
        torch_threads: int = 1,
    ) -> None:
        """Args:
        config, data, persist_state, torch_threads: as for ``NestedLearnerExecutor``.
        privacy: ``PrivacySettings`` as a JSON mapping: ``{"dp": {...}, "secure_aggregation": true, ...}``.
        """
        super().__init__(config, data, train_task, validate_task, persist_state, torch_threads)
        self.privacy = privacy
        self.settings = PrivacySettings.from_dict(privacy)
        self.ledger = PrivacyLedger(self.settings.dp)
        self._ledger_path: Path | None = None
        self._session_path: Path | None = None
        self._round: DeviceRound | None = None  # this round's secure-aggregation session, if any
        self._rng = np.random.default_rng(secrets.randbits(128))  # DP noise and stochastic rounding

    def _start(self, fl_ctx: FLContext) -> None:
        super()._start(fl_ctx)
        if self.persist_state:
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            root = Path(workspace.get_root_dir()) if workspace else Path.cwd()
            self._ledger_path = root / LEDGER_FILE
            self._session_path = root / SESSION_FILE
            if self._ledger_path.exists():
                history = json.loads(self._ledger_path.read_text())["history"]
                self.ledger = PrivacyLedger(self.settings.dp, history)
                self.log_info(
                    fl_ctx, f"privacy ledger resumed: {self.ledger.rounds} rounds, epsilon {self.ledger.epsilon():.3f}"
                )

    def _save_ledger(self) -> None:
        if self._ledger_path is None:
            return
        write_json_atomic(
            self._ledger_path, {"history": self.ledger.history, "epsilon": self.ledger.epsilon()}, mode=0o600
        )

    def _save_session(self) -> None:
        if self._round is None:
            DeviceRound.discard(self._session_path)
        else:
            self._round.save(self._session_path)

    def _load_session(self) -> None:
        """This round's session from disk, when this process did not run its earlier stages."""
        if self._round is None:
            self._round = DeviceRound.load(self._session_path, self.settings)

    def _outbound_metrics(self, metrics: dict) -> dict[str, float]:
        """The device's evaluation metrics (only with ``device_metrics``: they are computed on its own
        data and are not covered by the DP accounting) and its privacy spending."""
        return (dict(metrics) if self.settings.device_metrics else {}) | self._privacy_metrics()

    def _privacy_metrics(self) -> dict[str, float]:
        return {
            "dp_epsilon": self.ledger.epsilon(),
            "dp_delta": self.settings.dp.delta,
            "dp_rounds": self.ledger.rounds,
        }

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            if task_name in SECAGG_TASKS:
                return self._stage(task_name, shareable, fl_ctx)
            if task_name == self.train_task:
                return self._train(shareable, fl_ctx, abort_signal)
            reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
            if self.settings.device_metrics or reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                return reply
            validated = FLModelUtils.from_shareable(reply)  # merged and measured; the numbers stay here
            # not even in the log: the aggregator's operators can read client logs
            self.log_info(fl_ctx, f"{task_name}: {len(validated.metrics or {})} metrics kept on the device")
            return FLModelUtils.to_shareable(
                FLModel(params_type=ParamsType.FULL, params={}, metrics=self._privacy_metrics(), meta={})
            )
        except (WireError, ProtocolError, QuantizationError, ValueError, RuntimeError) as err:
            # a malformed or out-of-order protocol message: this device drops out of the round
            self._round = None
            self._save_session()
            self.log_error(fl_ctx, f"{task_name}: {err}; leaving this round's secure aggregation")
            return make_reply(ReturnCode.BAD_TASK_DATA)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        self._round = None
        self._save_session()  # a new round: whatever was left of the last one is void
        incoming = FLModelUtils.from_shareable(shareable)
        trained = super().execute(self.train_task, shareable, fl_ctx, abort_signal)
        if trained.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return trained
        result = FLModelUtils.from_shareable(trained)
        metrics = dict(result.metrics or {})
        meta = {"global_version": (result.meta or {}).get("global_version")}
        shapes = {name: tuple(v.shape) for name, v in (incoming.params or {}).items()}
        reason = self.ledger.over_budget_reason()
        if reason:
            self.log_warning(fl_ctx, f"sending no update this round: {reason}")
            meta["dp_skip_reason"] = reason
            metrics = self._outbound_metrics(metrics) | {"dp_contributed": 0}
            return FLModelUtils.to_shareable(
                FLModel(params_type=ParamsType.FULL, params={}, metrics=metrics, meta=meta)
            )
        if not self.settings.secure_aggregation:  # local DP: the noised delta itself is the release
            noised = self._noised(result.params, shapes)
            self.ledger.record_contribution()
            self._save_ledger()
            metrics = self._outbound_metrics(metrics) | {"dp_contributed": 1}
            return FLModelUtils.to_shareable(
                FLModel(params_type=ParamsType.DIFF, params=noised, metrics=metrics, meta=meta)
            )
        spec = (incoming.meta or {}).get("secagg")
        if not isinstance(spec, dict):
            raise WireError("the task carries no secagg round description")
        samples = (result.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
        delta = {name: result.params[name] for name in shapes}
        # the delta's norm before clipping stays in memory: data-dependent, and outside the mechanism
        self._round, _ = DeviceRound.begin(fl_ctx.get_identity_name(), spec, delta, self.settings, self._rng, samples)
        self._save_session()
        metrics = self._outbound_metrics(metrics)
        return self._reply(self._round.advert(), metrics, meta)

    def _noised(self, delta: dict, shapes: dict) -> dict:
        noised, _ = privatize(flatten(delta, shapes), self.settings.dp, self._rng)
        return unflatten(noised, shapes)

    def _stage(self, task_name: str, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        self._load_session()
        if self._round is None:
            raise RuntimeError(f"{task_name} without a secure-aggregation session (restarted, or skipped the round)")
        incoming = FLModelUtils.from_shareable(shareable)
        stage = STAGE_OF_TASK[task_name]
        message = self._round.answer(stage, message_bytes(incoming.params), self._charge)
        metrics = self._privacy_metrics() | {"dp_contributed": 1} if stage == MASK else None
        if stage == UNMASK:
            self._round = None
        self._save_session()
        return self._reply(message, metrics)

    def _charge(self) -> None:
        """Count this round against the budget before the masked vector leaves."""
        self.ledger.record_contribution()
        self._save_ledger()

    @staticmethod
    def _reply(message: object, metrics: dict | None = None, meta: dict | None = None) -> Shareable:
        return FLModelUtils.to_shareable(
            FLModel(
                params_type=ParamsType.FULL,
                params={SECAGG_KEY: as_message_array(message)},
                metrics=metrics or {},
                meta=meta or {},
            )
        )
