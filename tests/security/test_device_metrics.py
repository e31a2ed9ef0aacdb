"""Attack: the private job's devices report accuracy and loss measured on their own data next to
their DP-protected update. Those numbers are outside the DP accounting (a membership or
attribute signal the aggregator reads in the clear), so a private job built with its defaults
must send none of them; only the privacy spending (epsilon, delta, rounds) leaves a device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from app_custom.flare.private_learner_executor import PrivateLearnerExecutor
from app_custom.privacy.private_update import PrivacySettings
from jobs.nested_private import job as private_job

ROOT = Path(__file__).resolve().parents[2]
EXPORTED = ROOT / "jobs" / "nested_private" / "app" / "config"
PRIVACY_METRICS = {"dp_epsilon", "dp_delta", "dp_rounds", "dp_contributed"}


def _executor_args() -> dict:
    client = json.loads((EXPORTED / "config_fed_client.json").read_text())
    (executor,) = [e["executor"] for e in client["executors"] if "train" in e["tasks"]]
    assert executor["path"].endswith("PrivateLearnerExecutor")
    return executor["args"]


def test_the_exported_private_job_keeps_device_metrics_off():
    server = json.loads((EXPORTED / "config_fed_server.json").read_text())
    (controller,) = [w for w in server["workflows"] if "privacy" in w["args"]]
    for privacy in (_executor_args()["privacy"], controller["args"]["privacy"]):
        assert PrivacySettings.from_dict(privacy).device_metrics is False


def test_a_device_of_the_exported_job_answers_validate_with_its_privacy_spending_only():
    args = _executor_args()
    executor = PrivateLearnerExecutor(args["config"], args["data"], args["privacy"], persist_state=False)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    executor._start(fl_ctx)  # what START_RUN does: this site's learner on its own data
    task = FLModelUtils.to_shareable(
        FLModel(params_type=ParamsType.FULL, params=executor.learner.initial_slow(), meta={"global_version": 0})
    )
    reply = executor.execute("validate", task, fl_ctx, Signal())
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    sent = FLModelUtils.from_shareable(reply)
    assert set(sent.metrics) <= PRIVACY_METRICS, sent.metrics
    assert sent.params == {}


@pytest.mark.parametrize(("flags", "on"), [([], False), (["--device-metrics"], True)])
def test_job_py_sends_device_metrics_only_when_asked(flags, on):
    parser = argparse.ArgumentParser()
    private_job.add_arguments(parser)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    privacy = private_job.privacy(parser.parse_args(flags))
    assert PrivacySettings.from_dict(privacy).device_metrics is on
