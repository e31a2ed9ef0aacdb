"""Learners that break the rules, for the tests that prove the guards catch them.

They run inside FLARE's simulator, so they are real executors: FLARE's job export copies this
module into the job's custom code.
"""

import numpy as np
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from app_custom.egress import SECAGG_KEY
from app_custom.flare.learner_executor import NestedLearnerExecutor, device_index
from app_custom.flare.private_learner_executor import SHARE_TASK, PrivateLearnerExecutor


class LeakyLearner(NestedLearnerExecutor):
    """Adds one of the device's fast-layer parameters to every training result."""

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if task_name != self.train_task or reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return reply
        model = FLModelUtils.from_shareable(reply)
        name = self.learner.private_names[-1]
        model.params[name] = dict(self.learner.model.named_parameters())[name].detach().numpy().copy()
        return FLModelUtils.to_shareable(model)


class FaultyLearner(NestedLearnerExecutor):
    """Device 1 sends NaN, device 2 a wrong shape, device 3 an unknown key; others behave."""

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        index = device_index(fl_ctx.get_identity_name())
        if task_name != self.train_task or index > 2 or reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return reply
        model = FLModelUtils.from_shareable(reply)
        name = sorted(model.params)[0]
        if index == 0:
            model.params[name] = np.full_like(model.params[name], np.nan)
        elif index == 1:
            model.params[name] = np.zeros((3, 3, 3), np.float32)
        else:
            model.params["trunk.extra"] = np.zeros(4, np.float32)
        return FLModelUtils.to_shareable(model)


class SpentDevice(PrivateLearnerExecutor):
    """A private learner whose device 1 has already spent its epsilon budget (a history of 500 rounds)."""

    def _start(self, fl_ctx):
        super()._start(fl_ctx)
        if device_index(fl_ctx.get_identity_name()) == 0:
            for _ in range(500):
                self.ledger.record_contribution()


class GarblingDevice(PrivateLearnerExecutor):
    """Device 2 answers the share stage with bytes that are no protocol message; others behave."""

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if task_name != SHARE_TASK or device_index(fl_ctx.get_identity_name()) != 1:
            return reply
        model = FLModelUtils.from_shareable(reply)
        model.params[SECAGG_KEY] = np.frombuffer(b"\x00\x00\x00\x02{}garbage", dtype=np.uint8).copy()
        return FLModelUtils.to_shareable(model)


class SpentAndGarblingDevices(SpentDevice, GarblingDevice):
    """Device 1 is over its budget and device 2 garbles its share stage: two faults, one round."""
