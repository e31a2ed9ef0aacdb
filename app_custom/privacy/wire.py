"""Secure-aggregation messages as bytes, and back, checked field by field at the trust boundary.

Layout: a 4-byte big-endian length, a JSON header (every field of the message except a masked
vector's payload, 32-byte values in base64), then the raw payload. ``decode`` builds only the
message type the caller expects and raises ``WireError`` naming the first field that is wrong.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import fields, is_dataclass

from .secagg import (
    Header,
    KeyAdvert,
    MaskedInput,
    Roster,
    ShareBundle,
    SharesFor,
    UnmaskRequest,
    UnmaskShares,
)
from .secagg_crypto import SessionContext

MAX_HEADER_BYTES = 64 << 20
_LEN = 4


class WireError(ValueError):
    """Bytes that are not a well-formed message of the expected type."""


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return {"$b": base64.b64encode(value).decode()}
    if isinstance(value, SessionContext):
        return {"job_id": value.job_id, "round": value.round, "cohort_id": value.cohort_id}
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode(message: object) -> bytes:
    payload = message.payload if isinstance(message, MaskedInput) else b""
    body = _plain(message)
    if isinstance(message, MaskedInput):
        body["payload"] = len(payload)
    header = json.dumps({"type": type(message).__name__, "body": body}, separators=(",", ":")).encode()
    return len(header).to_bytes(_LEN, "big") + header + payload


# ---- strict readers --------------------------------------------------------------------------------
def _field(body: dict, name: str, where: str) -> object:
    if not isinstance(body, dict) or name not in body:
        raise WireError(f"{where}: missing field {name!r}")
    return body[name]


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise WireError(f"{where}: expected a non-empty string, got {type(value).__name__}")
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{where}: expected an integer, got {type(value).__name__}")
    return value


def _bytes(value: object, where: str, size: int | None = None) -> bytes:
    if not (isinstance(value, dict) and set(value) == {"$b"} and isinstance(value["$b"], str)):
        raise WireError(f"{where}: expected base64 bytes")
    try:
        raw = base64.b64decode(value["$b"], validate=True)
    except ValueError as err:
        raise WireError(f"{where}: bad base64 ({err})") from err
    if size is not None and len(raw) != size:
        raise WireError(f"{where}: expected {size} bytes, got {len(raw)}")
    return raw


def _names(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise WireError(f"{where}: expected a list of device ids")
    return tuple(_str(v, where) for v in value)


def _mapping(value: object, where: str, read: Callable[[object, str], object]) -> dict:
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a mapping")
    return {_str(k, where): read(v, f"{where}[{k}]") for k, v in value.items()}


def _context(value: object, where: str) -> SessionContext:
    try:
        return SessionContext(
            _str(_field(value, "job_id", where), where),
            _int(_field(value, "round", where), where),
            _str(_field(value, "cohort_id", where), where),
        )
    except ValueError as err:
        raise WireError(f"{where}: {err}") from err


def _header(value: object, where: str) -> Header:
    return Header(
        _context(_field(value, "context", where), f"{where}.context"),
        _str(_field(value, "stage", where), f"{where}.stage"),
        _str(_field(value, "sender", where), f"{where}.sender"),
    )


def _share(value: object, where: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise WireError(f"{where}: expected a share [x, y]")
    return _int(value[0], where), _int(value[1], where)


def _advert(body: object, where: str = "KeyAdvert") -> KeyAdvert:
    return KeyAdvert(
        _header(_field(body, "header", where), f"{where}.header"),
        _bytes(_field(body, "transport_public", where), f"{where}.transport_public", 32),
        _bytes(_field(body, "masking_public", where), f"{where}.masking_public", 32),
        _bytes(_field(body, "seed_commitment", where), f"{where}.seed_commitment", 32),
    )


def _roster(body: object, where: str = "Roster") -> Roster:
    return Roster(
        _context(_field(body, "context", where), f"{where}.context"),
        _mapping(_field(body, "adverts", where), f"{where}.adverts", _advert),
        _mapping(_field(body, "neighbours", where), f"{where}.neighbours", _names),
    )


def _commitment_pair(value: object, where: str) -> tuple[bytes, bytes]:
    if not (isinstance(value, list) and len(value) == 2):
        raise WireError(f"{where}: expected two commitments")
    return _bytes(value[0], where, 32), _bytes(value[1], where, 32)


def _bundle(body: object, where: str = "ShareBundle") -> ShareBundle:
    return ShareBundle(
        _header(_field(body, "header", where), f"{where}.header"),
        _mapping(_field(body, "sealed", where), f"{where}.sealed", _bytes),
        _mapping(_field(body, "commitments", where), f"{where}.commitments", _commitment_pair),
    )


def _shares_for(body: object, where: str = "SharesFor") -> SharesFor:
    return SharesFor(
        _context(_field(body, "context", where), f"{where}.context"),
        _names(_field(body, "senders", where), f"{where}.senders"),
        _mapping(_field(body, "sealed", where), f"{where}.sealed", _bytes),
    )


def _request(body: object, where: str = "UnmaskRequest") -> UnmaskRequest:
    return UnmaskRequest(
        _context(_field(body, "context", where), f"{where}.context"),
        _names(_field(body, "survivors", where), f"{where}.survivors"),
        _names(_field(body, "dropped", where), f"{where}.dropped"),
    )


def _unmask(body: object, where: str = "UnmaskShares") -> UnmaskShares:
    return UnmaskShares(
        _header(_field(body, "header", where), f"{where}.header"),
        _mapping(_field(body, "self_shares", where), f"{where}.self_shares", _share),
        _mapping(_field(body, "masking_shares", where), f"{where}.masking_shares", _share),
    )


def _routed(body: object, where: str = "Routing") -> dict[str, SharesFor]:
    return _mapping(body, where, _shares_for)


READERS: dict[type, Callable] = {
    KeyAdvert: _advert,
    Roster: _roster,
    ShareBundle: _bundle,
    SharesFor: _shares_for,
    UnmaskRequest: _request,
    UnmaskShares: _unmask,
}


def decode(raw: bytes, expected: type) -> object:
    """The message of type ``expected`` that ``raw`` holds, or ``WireError``."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < _LEN:
        raise WireError(f"{expected.__name__}: expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    size = int.from_bytes(raw[:_LEN], "big")
    if size > MAX_HEADER_BYTES or _LEN + size > len(raw):
        raise WireError(f"{expected.__name__}: header of {size} bytes does not fit the {len(raw)} received")
    try:
        message = json.loads(raw[_LEN : _LEN + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"{expected.__name__}: header is not JSON ({err})") from err
    if not isinstance(message, dict) or message.get("type") != expected.__name__:
        got = message.get("type") if isinstance(message, dict) else type(message).__name__
        raise WireError(f"expected a {expected.__name__} message, got {got!r}")
    body, payload = message.get("body"), raw[_LEN + size :]
    if expected is MaskedInput:
        where = "MaskedInput"
        if _int(_field(body, "payload", where), f"{where}.payload") != len(payload):
            raise WireError(f"{where}: payload length does not match its header")
        unreadable = _field(body, "unreadable_shares", where)
        return MaskedInput(
            _header(_field(body, "header", where), f"{where}.header"),
            _int(_field(body, "ring_bits", where), f"{where}.ring_bits"),
            _int(_field(body, "length", where), f"{where}.length"),
            payload,
            _names(unreadable, f"{where}.unreadable_shares"),
        )
    if payload:
        raise WireError(f"{expected.__name__}: unexpected {len(payload)} bytes after the header")
    if expected is dict:
        return _routed(body)
    if expected not in READERS:
        raise WireError(f"no reader for {expected.__name__}")
    return READERS[expected](body)
