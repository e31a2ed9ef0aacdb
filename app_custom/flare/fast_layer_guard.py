"""FLARE's outbound result filter for "fast layers never leave the device" (the policy itself is
``app_custom.egress``, which the edge daemon applies too).

It allow-lists everything in a result: a result may be an empty
error reply, or a single DXO of model weights (or weight differences) whose parameters all
belong to a shared level (by the configuration's patterns) and are plain arrays, whose meta
holds only scalar metrics and the known scalar fields, and nothing else beside it. Anything
else (a fast-layer key, an unknown key, a nested or non-array value, an array hidden in the
metrics or meta, an extra payload, a payload on an error reply) rejects the whole result: the
reasons are logged and the result is replaced by an empty ``TASK_RESULT_FILTER_ERROR`` reply,
so nothing of it leaves (and the audit after this filter records the refusal).

A private learner's result instead carries one secure-aggregation message (a uint8 array under
``SECAGG_KEY``): it passes only if it decodes as a message a device sends (key advert, sealed
shares, masked vector of ring elements, unmask shares) and nothing else is beside it.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from app_custom.egress import is_scalar, leaving_keys_problems
from app_custom.nested.config import NestedConfig

RESULT_KEYS = {ReservedHeaderKey.HEADERS, "DXO"}
PARAM_KINDS = {DataKind.WEIGHTS, DataKind.WEIGHT_DIFF}
# meta fields a learner result may carry besides the metrics, all scalars
SCALAR_META = {"global_version", FLMetaKey.NUM_STEPS_CURRENT_ROUND}
# short text fields: why a private device sent no update
TEXT_META = {"dp_skip_reason"}
MAX_TEXT = 400


def result_problems(config: NestedConfig, shareable: Shareable) -> list[str]:
    """Everything in an outbound result that may not leave the device."""
    extra = sorted(set(shareable) - RESULT_KEYS)
    headers = shareable.get(ReservedHeaderKey.HEADERS) or {}
    problems = [
        f"header {key!r} carries a {type(value).__name__}"
        for key, value in headers.items()
        if isinstance(value, (np.ndarray, bytes, bytearray)) or type(value).__module__.startswith("torch")
    ]
    if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
        payload = extra + (["DXO"] if "DXO" in shareable else [])
        return problems + ([f"an error reply carrying {payload}"] if payload else [])
    problems += [f"extra result key {key!r}" for key in extra]
    dxo = from_shareable(shareable)
    if dxo.data_kind not in PARAM_KINDS:
        problems.append(f"data kind {dxo.data_kind!r}, expected one of {sorted(PARAM_KINDS)}")
    if not isinstance(dxo.data, dict):
        return problems + [f"data is a {type(dxo.data).__name__}, not a mapping of named arrays"]
    meta = dict(dxo.meta or {})
    metrics = meta.pop(FLMetaKey.INITIAL_METRICS, None) or {}
    if not isinstance(metrics, dict):
        problems.append(f"metrics are a {type(metrics).__name__}, not a mapping")
        metrics = {}
    for key, value in meta.items():
        if key in TEXT_META:
            if not (isinstance(value, str) and len(value) <= MAX_TEXT):
                problems.append(f"meta field {key!r} is not a text of at most {MAX_TEXT} characters")
        elif key not in SCALAR_META:
            problems.append(f"unknown meta field {key!r}")
        elif not is_scalar(value):
            problems.append(f"meta field {key!r} is a {type(value).__name__}, not a scalar")
    return problems + leaving_keys_problems(config, dxo.data, metrics)


class FastLayerGuard(Filter):
    def __init__(self, config: dict) -> None:
        """Args:
        config: the same nested learning configuration the learner uses (its levels say what is shared).
        """
        super().__init__()
        self.config = config  # FLARE's job export reads constructor arguments back from attributes
        self.nested = NestedConfig.from_dict(config)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        problems = result_problems(self.nested, shareable)
        if problems:
            round_ = shareable.get_header(AppConstants.CURRENT_ROUND)
            self.log_error(fl_ctx, f"round {round_}: outbound result rejected, it carries {problems}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        return shareable
