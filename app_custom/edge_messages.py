"""What a leaf and a device say to each other through FLARE's edge API (JSON over HTTP, via the
routing proxy), and its checks at both ends.

Leaf to device (``TaskResponse.task_data``)::

    {"fleetnest": 1, "stage": "train", "spec": {"job_id", "round", "cohort_id", "cohort"},
     "global_version": 3, "weights": {name: {"shape": [...], "f32": base64}}, "message": base64}

``weights`` only for ``train`` (the global slow layers), ``message`` (a secure-aggregation
message) for the later stages. Device to leaf (``ResultReport.result``)::

    {"envelope": base64 of a signed envelope (``device_identity.sign_message``)}

whose payload is JSON ``{"fleetnest": 1, "device", "stage", "session": [job_id, round, cohort_id],
"message": base64 | null, "skip_reason": str | null, "metrics": {name: number}}``. The envelope
ties the answer to a device certificate; the session triple and the stage tie it to one step of
one session, so a replay into another session or stage is refused.

A device signs every task request: a token in its cookie
(``{"enrol": base64 envelope}``, payload ``{"fleetnest": 1, "purpose": "enrol", "device",
"job_id", "time"}``): the leaf enrols only devices whose certificate it trusts now, with a token
for this job no older than ``ENROL_WINDOW_S`` (a device renews it every minute), so neither a place
in a cohort nor the global slow layers go to a device id alone.
"""

from __future__ import annotations

import base64
import json
import math
import numbers
from collections.abc import Mapping

import numpy as np

PROTOCOL = 1
MAX_WEIGHT_VALUES = 50_000_000
ENROL_WINDOW_S = 120.0


class EdgeMessageError(ValueError):
    """A malformed edge message; the text names the field."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise EdgeMessageError(f"{where}: expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as err:
        raise EdgeMessageError(f"{where}: not base64 ({err})") from err


def encode_weights(tensors: Mapping[str, np.ndarray]) -> dict:
    return {
        name: {"shape": list(np.shape(value)), "f32": _b64(np.ascontiguousarray(value, dtype="<f4").tobytes())}
        for name, value in tensors.items()
    }


def decode_weights(raw: object, expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Named float32 arrays; with ``expected``, exactly those names and shapes. All finite."""
    if not isinstance(raw, dict) or not raw:
        raise EdgeMessageError("weights: expected a non-empty mapping of named tensors")
    if expected is not None and set(raw) != set(expected):
        raise EdgeMessageError(f"weights: names differ from the model's ({sorted(set(raw) ^ set(expected))[:5]})")
    out, total = {}, 0
    for name, entry in raw.items():
        where = f"weights[{name!r}]"
        if not isinstance(entry, dict) or set(entry) != {"shape", "f32"}:
            raise EdgeMessageError(f"{where}: expected shape and f32")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise EdgeMessageError(f"{where}: shape must be a list of non-negative integers")
        if expected is not None and tuple(shape) != tuple(expected[name]):
            raise EdgeMessageError(f"{where}: shape {tuple(shape)}, expected {tuple(expected[name])}")
        total += math.prod(shape)
        if total > MAX_WEIGHT_VALUES:
            raise EdgeMessageError(f"weights: more than {MAX_WEIGHT_VALUES} values")
        data = _unb64(entry["f32"], where)
        if len(data) != 4 * math.prod(shape):
            raise EdgeMessageError(f"{where}: {len(data)} bytes for shape {tuple(shape)}")
        value = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
        if not np.isfinite(value).all():
            raise EdgeMessageError(f"{where}: not finite")
        out[name] = value
    return out


def task_data(stage: str, spec: dict, version: int, weights: Mapping | None, message: bytes | None) -> dict:
    data = {"fleetnest": PROTOCOL, "stage": stage, "spec": spec, "global_version": version}
    if weights is not None:
        data["weights"] = encode_weights(weights)
    if message is not None:
        data["message"] = _b64(message)
    return data


def read_task(data: object) -> tuple[str, dict, int, dict | None, bytes | None]:
    """(stage, spec, global version, weights or None, message or None) of a leaf's task."""
    if not isinstance(data, dict) or data.get("fleetnest") != PROTOCOL:
        raise EdgeMessageError(f"not a fleetnest task of protocol {PROTOCOL}")
    stage, spec, version = data.get("stage"), data.get("spec"), data.get("global_version")
    if not isinstance(stage, str) or not isinstance(spec, dict):
        raise EdgeMessageError("task: stage and spec are required")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise EdgeMessageError(f"task: global_version must be a non-negative integer, got {version!r}")
    weights = decode_weights(data["weights"]) if "weights" in data else None
    message = _unb64(data["message"], "task.message") if "message" in data else None
    return stage, spec, version, weights, message


def session_of(spec: Mapping) -> list:
    return [spec.get("job_id"), spec.get("round"), spec.get("cohort_id")]


def answer_payload(
    device: str, stage: str, spec: Mapping, message: bytes | None, metrics: Mapping, skip_reason: str | None = None
) -> bytes:
    return json.dumps(
        {
            "fleetnest": PROTOCOL,
            "device": device,
            "stage": stage,
            "session": session_of(spec),
            "message": _b64(message) if message is not None else None,
            "skip_reason": skip_reason,
            "metrics": dict(metrics),
        },
        sort_keys=True,
    ).encode()


def read_answer(payload: bytes) -> dict:
    """The checked fields of a device's answer (``message`` as bytes or None)."""
    try:
        answer = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EdgeMessageError(f"answer is not JSON: {err}") from err
    fields = {"fleetnest", "device", "stage", "session", "message", "skip_reason", "metrics"}
    if not isinstance(answer, dict) or set(answer) != fields or answer["fleetnest"] != PROTOCOL:
        raise EdgeMessageError(f"answer must have exactly the fields {sorted(fields)} of protocol {PROTOCOL}")
    if not isinstance(answer["device"], str) or not isinstance(answer["stage"], str):
        raise EdgeMessageError("answer: device and stage must be text")
    if not isinstance(answer["session"], list) or len(answer["session"]) != 3:
        raise EdgeMessageError("answer: session must be [job_id, round, cohort_id]")
    metrics = answer["metrics"]
    if not isinstance(metrics, dict) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise EdgeMessageError("answer: metrics must map names to numbers")
    reason = answer["skip_reason"]
    if reason is not None and not (isinstance(reason, str) and len(reason) <= 400):
        raise EdgeMessageError("answer: skip_reason must be a short text or null")
    if answer["message"] is not None:
        answer["message"] = _unb64(answer["message"], "answer.message")
    elif reason is None:
        raise EdgeMessageError("answer: a message or a skip_reason is required")
    return answer


def result_body(envelope: bytes) -> dict:
    return {"envelope": _b64(envelope)}


def read_result_body(result: object) -> bytes:
    if not isinstance(result, dict) or set(result) != {"envelope"}:
        raise EdgeMessageError("result must be {'envelope': base64}")
    return _unb64(result["envelope"], "result.envelope")


def enrol_payload(device: str, job_id: str, now: float) -> bytes:
    body = {"fleetnest": PROTOCOL, "purpose": "enrol", "device": device, "job_id": job_id, "time": now}
    return json.dumps(body, sort_keys=True).encode()


def check_enrol(payload: bytes, device: str, job_id: str, now: float) -> None:
    """``EdgeMessageError`` unless ``payload`` is ``device``'s fresh enrolment token for ``job_id``."""
    try:
        token = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EdgeMessageError(f"enrolment token is not JSON: {err}") from err
    if not isinstance(token, dict) or token.get("purpose") != "enrol" or token.get("fleetnest") != PROTOCOL:
        raise EdgeMessageError("not an enrolment token")
    if token.get("device") != device or token.get("job_id") != job_id:
        raise EdgeMessageError(f"an enrolment token of {token.get('device')!r} for job {token.get('job_id')!r}")
    stamp = token.get("time")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or abs(now - stamp) > ENROL_WINDOW_S:
        raise EdgeMessageError(f"enrolment token time {stamp!r} is more than {ENROL_WINDOW_S:.0f} s from now")


def enrol_cookie(envelope: bytes) -> dict:
    return {"enrol": _b64(envelope)}


def read_enrol_cookie(cookie: object) -> bytes:
    if not isinstance(cookie, dict) or "enrol" not in cookie:
        raise EdgeMessageError("the task request carries no enrolment token")
    return _unb64(cookie["enrol"], "cookie.enrol")
