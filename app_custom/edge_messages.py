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

A device signs every task request over a challenge the leaf gave it. Each answer of the leaf's
(task responses and result responses) carries a fresh one in its cookie, ``{"fleetnest": 1,
"leaf", "challenge": base64, "window": seconds}``; the device's next task request carries its
token, ``{"poll": base64 envelope}`` with payload ``{"fleetnest": 1, "purpose": "poll", "device",
"job_id", "leaf", "challenge"}``. A request without a token gets a challenge and nothing else.
``PollChallenges`` is the leaf's side: a challenge is its MAC over (job, leaf, device, nonce, time)
and is good once, at that leaf, for that device, for ``POLL_WINDOW_S`` by the leaf's own clock;
so neither a place in a cohort nor the global slow layers go to a device id alone, or to a token
read off the wire and sent again, here or at another leaf (docs/hierarchy-trust.md).
"""

from __future__ import annotations

import base64
import json
import math
import numbers
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

PROTOCOL = 1
MAX_WEIGHT_VALUES = 50_000_000
POLL_WINDOW_S = 60.0  # a challenge is good for this long after the leaf issued it
MAX_SPENT = 500_000  # challenges a leaf remembers as used within one window (each needed a device's signature)
_NONCE, _STAMP, _MAC = 16, 8, 32
CHALLENGE_LABEL = b"fleetnest-poll-challenge|"


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


class ChallengeError(EdgeMessageError):
    """A poll token whose challenge is not good here now: another leaf's, stale, forged or used."""


def poll_payload(device: str, job_id: str, challenge: Mapping) -> bytes:
    """What a device signs to poll with ``challenge`` (the leaf's cookie, ``read_challenge``)."""
    body = {
        "fleetnest": PROTOCOL,
        "purpose": "poll",
        "device": device,
        "job_id": job_id,
        "leaf": challenge["leaf"],
        "challenge": challenge["challenge"],
    }
    return json.dumps(body, sort_keys=True).encode()


def read_poll_token(payload: bytes) -> dict:
    """The fields of a poll token's payload (not yet verified: the caller opens the envelope)."""
    try:
        token = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EdgeMessageError(f"poll token is not JSON: {err}") from err
    fields = {"fleetnest", "purpose", "device", "job_id", "leaf", "challenge"}
    if not isinstance(token, dict) or set(token) != fields or token["purpose"] != "poll":
        raise EdgeMessageError(f"not a poll token (fields {sorted(fields)}, purpose 'poll')")
    if token["fleetnest"] != PROTOCOL or not all(isinstance(token[k], str) for k in fields - {"fleetnest"}):
        raise EdgeMessageError(f"poll token: protocol {PROTOCOL} and text fields expected")
    return token


def poll_cookie(envelope: bytes) -> dict:
    return {"poll": _b64(envelope)}


def read_poll_cookie(cookie: object) -> bytes | None:
    """The signed poll token a task request carries, or None when it carries none."""
    if not isinstance(cookie, dict) or "poll" not in cookie:
        return None
    return _unb64(cookie["poll"], "cookie.poll")


def read_challenge(cookie: object) -> dict | None:
    """The leaf's challenge in an answer's cookie (``{"leaf", "challenge", "window"}``), or None."""
    if not isinstance(cookie, dict) or cookie.get("fleetnest") != PROTOCOL:
        return None
    leaf, challenge, window = cookie.get("leaf"), cookie.get("challenge"), cookie.get("window")
    if not (isinstance(leaf, str) and isinstance(challenge, str) and len(challenge) <= 128):
        return None
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
        return None
    return {"leaf": leaf, "challenge": challenge, "window": float(window)}


class PollChallenges:
    """A leaf's single-use poll challenges for one job.

    ``issue`` hands a device a challenge: a fresh nonce and the leaf's clock, with the leaf's MAC
    (HMAC-SHA256, a key of this process) over them and (job, leaf, device), so the leaf keeps no
    state for the challenges it hands out and a flood of requests costs it no memory. ``check``
    (cheap, before any signature is verified) refuses a token for another leaf, job or device, a
    challenge this leaf did not issue to that device, one older than ``window`` seconds and one
    already used; ``spend`` (after the signature) marks it used. Used nonces are remembered for
    ``window`` seconds, at most ``capacity`` of them: past that, polls are refused until some
    expire (each entry took a device's valid signature, so only enrolled devices can fill it).
    """

    def __init__(
        self,
        job_id: str,
        leaf: str,
        window: float = POLL_WINDOW_S,
        capacity: int = MAX_SPENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id, self.leaf, self.window, self.capacity = job_id, leaf, float(window), capacity
        self._clock = clock
        self._key = os.urandom(32)
        self._spent: OrderedDict[bytes, float] = OrderedDict()  # nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def _mac(self, device: str, body: bytes) -> hmac.HMAC:
        mac = hmac.HMAC(self._key, hashes.SHA256())
        context = json.dumps([self.job_id, self.leaf, device]).encode()
        mac.update(CHALLENGE_LABEL + struct.pack(">I", len(context)) + context + body)
        return mac

    def issue(self, device: str) -> dict:
        """The cookie that gives ``device`` its next challenge."""
        body = os.urandom(_NONCE) + struct.pack(">d", self._clock())
        challenge = _b64(body + self._mac(device, body).finalize())
        return {"fleetnest": PROTOCOL, "leaf": self.leaf, "challenge": challenge, "window": self.window}

    def check(self, token: Mapping, device: str) -> bytes:
        """The nonce of ``token`` (``read_poll_token``) if its challenge is good for ``device`` here
        now; ``ChallengeError`` or ``EdgeMessageError`` saying why not."""
        if token["leaf"] != self.leaf:
            raise ChallengeError(f"a token for leaf {token['leaf']!r}, this is {self.leaf!r}")
        if token["job_id"] != self.job_id:
            raise ChallengeError(f"a token for job {token['job_id']!r}, this is {self.job_id!r}")
        if token["device"] != device:
            raise EdgeMessageError(f"a token of {token['device']!r}, sent as {device!r}")
        raw = _unb64(token["challenge"], "poll token challenge")
        if len(raw) != _NONCE + _STAMP + _MAC:
            raise ChallengeError("a challenge of the wrong length")
        body = raw[: _NONCE + _STAMP]
        try:
            self._mac(device, body).verify(raw[_NONCE + _STAMP :])  # constant-time
        except InvalidSignature as err:
            raise ChallengeError(f"a challenge this leaf did not issue to {device!r} (or a restarted leaf's)") from err
        (issued,) = struct.unpack(">d", body[_NONCE:])
        age = self._clock() - issued
        if not 0 <= age <= self.window:
            raise ChallengeError(f"a challenge {age:.0f} s old (good for {self.window:.0f} s)")
        nonce = body[:_NONCE]
        with self._lock:
            if nonce in self._spent:
                raise ChallengeError("a challenge already used (a replay)")
        return nonce

    def spend(self, nonce: bytes) -> None:
        """Mark an accepted token's challenge used; ``ChallengeError`` if it already was (a race)."""
        now = self._clock()
        with self._lock:
            while self._spent and next(iter(self._spent.values())) <= now:
                self._spent.popitem(last=False)
            if nonce in self._spent:
                raise ChallengeError("a challenge already used (a replay)")
            if len(self._spent) >= self.capacity:
                raise ChallengeError(f"{self.capacity} polls within {self.window:.0f} s: try again shortly")
            self._spent[nonce] = now + self.window
