"""What may leave a device: the egress policy, one piece of code for every transport.

Outbound parameters may only be arrays of a shared level (by the configuration's patterns, never a
fast-layer key), or instead one secure-aggregation message a device sends (key advert, sealed shares,
masked vector of ring elements, consistency signature, unmask shares) with nothing beside it;
metrics may only be scalars. FLARE's result filter (``app_custom.flare.fast_layer_guard``) and the
edge daemon's fleet client (``edge_runtime.fleet_device``) both refuse by it, and the outbound
audits summarize a secure-aggregation message with ``secagg_summary`` (never its values).
"""

from __future__ import annotations

import numbers
from fnmatch import fnmatchcase

import numpy as np

from app_custom.nested.config import NestedConfig
from app_custom.privacy.secagg import ConsistencySignature, KeyAdvert, MaskedInput, ShareBundle, UnmaskShares
from app_custom.privacy.wire import WireError, decode_message

# The private learner's only array: one secure-aggregation message, as uint8 (see
# private_learner_executor). It may leave only as one of the device-to-aggregator messages.
SECAGG_KEY = "__secagg_message__"
DEVICE_MESSAGES = (KeyAdvert, ShareBundle, MaskedInput, ConsistencySignature, UnmaskShares)


def is_scalar(value: object) -> bool:
    """A value that may leave as a metric or meta field: a real number (not a bool), or None."""
    return value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def secagg_message_problems(value: object) -> list[str]:
    """Problems with a secure-aggregation message array (empty list: a well-formed device message)."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        return [f"{SECAGG_KEY!r} is not a 1-D uint8 array"]
    raw = value.tobytes()
    errors = []
    for kind in DEVICE_MESSAGES:
        try:
            decode_message(raw, kind)
            return []
        except WireError as err:
            errors.append(str(err))
    return [f"{SECAGG_KEY!r} is not a device secure-aggregation message ({errors[-1]})"]


def leaving_keys_problems(config: NestedConfig, params: dict, metrics: dict | None) -> list[str]:
    """What among outbound parameters and metrics may not leave the device (empty list: all clear)."""
    if SECAGG_KEY in params:
        extra = sorted(set(params) - {SECAGG_KEY})
        problems = [f"parameters {extra} beside a secure-aggregation message"] if extra else []
        problems += secagg_message_problems(params[SECAGG_KEY])
        return problems + _metric_problems(metrics)
    problems = []
    shared = [p for level in config.shared_levels for p in level.patterns]
    private = [p for level in config.private_levels for p in level.patterns]
    for key, value in params.items():
        if any(fnmatchcase(key, p) for p in private):
            problems.append(f"fast-layer parameter {key!r}")
        elif not any(fnmatchcase(key, p) for p in shared):
            problems.append(f"parameter {key!r} of no shared level")
        elif value is not None and not isinstance(value, np.ndarray):
            problems.append(f"parameter {key!r} is a {type(value).__name__}, not an array")
    return problems + _metric_problems(metrics)


def _metric_problems(metrics: dict | None) -> list[str]:
    return [
        f"non-scalar metric {name!r} ({type(value).__name__})"
        for name, value in (metrics or {}).items()
        if isinstance(value, bool) or not isinstance(value, numbers.Real)
    ]


def secagg_summary(value: object) -> dict:
    """The type of a secure-aggregation message and, for a masked vector, its length and ring."""
    raw = value.tobytes() if hasattr(value, "tobytes") else b""
    for kind in DEVICE_MESSAGES:
        try:
            message = decode_message(raw, kind)
        except WireError:
            continue
        summary = {"type": kind.__name__, "bytes": len(raw)}
        if isinstance(message, MaskedInput):
            summary |= {"length": message.length, "ring_bits": message.ring_bits, "payload_bytes": len(message.payload)}
        return summary
    return {"type": None, "bytes": len(raw)}
