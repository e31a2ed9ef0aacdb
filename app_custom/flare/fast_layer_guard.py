"""The one place that enforces "fast layers never leave the device".

An outbound result filter: a result may carry only parameters that belong to a shared level
(allow-list by the configuration's patterns) and scalar metrics. Anything else (a fast-layer
key, an unknown key, an array hidden in the metrics) rejects the whole result: the keys are
logged and the result is replaced by an empty ``TASK_RESULT_FILTER_ERROR`` reply, so nothing
of it leaves (and the audit after this filter records the refusal).
"""

from __future__ import annotations

import numbers
from fnmatch import fnmatchcase

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from app_custom.nested.config import NestedConfig


def leaving_keys_problems(config: NestedConfig, params: dict, metrics: dict | None) -> list[str]:
    """What in an outbound payload may not leave the device (empty list: all clear)."""
    problems = []
    shared = [p for level in config.shared_levels for p in level.patterns]
    private = [p for level in config.private_levels for p in level.patterns]
    for key in params:
        if any(fnmatchcase(key, p) for p in private):
            problems.append(f"fast-layer parameter {key!r}")
        elif not any(fnmatchcase(key, p) for p in shared):
            problems.append(f"parameter {key!r} of no shared level")
    for name, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            problems.append(f"non-scalar metric {name!r} ({type(value).__name__})")
    return problems


class FastLayerGuard(Filter):
    def __init__(self, config: dict) -> None:
        """Args:
        config: the same nested learning configuration the learner uses (its levels say what is shared).
        """
        super().__init__()
        self.config = config  # FLARE's job export reads constructor arguments back from attributes
        self.nested = NestedConfig.from_dict(config)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no payload
        dxo: DXO = from_shareable(shareable)
        params = dxo.data if isinstance(dxo.data, dict) else {}
        metrics = dxo.meta.get(FLMetaKey.INITIAL_METRICS) if isinstance(dxo.meta, dict) else None
        problems = leaving_keys_problems(self.nested, params, metrics)
        if problems:
            round_ = shareable.get_header(AppConstants.CURRENT_ROUND)
            self.log_error(fl_ctx, f"round {round_}: outbound result rejected, it carries {problems}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        return shareable
