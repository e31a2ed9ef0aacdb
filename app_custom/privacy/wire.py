"""Secure-aggregation messages as bytes, and back, checked field by field at the trust boundary.

Layout: a 4-byte big-endian length, a JSON header, then one binary blob. Every bytes field of the
message (keys, commitments, sealed shares, the masked vector) lives in the blob; the header names
it by ``{"$b": [offset, length]}``, so nothing is inflated by text encoding. ``decode`` builds
only the message type the caller expects and raises ``WireError`` naming the first field that is
wrong; every byte of the blob must belong to exactly the fields that reference it, in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import fields, is_dataclass

from . import shamir
from .peer_certificates import MAX_CERTIFICATE_BYTES, MAX_SIGNATURE_BYTES
from .secagg import (
    ConsistencySignature,
    Header,
    KeyAdvert,
    MaskedInput,
    Roster,
    ShareBundle,
    SharesFor,
    UnmaskRequest,
    UnmaskShares,
)
from .secagg_crypto import SEALED_SHARES_BYTES, SHARE_COMMITMENT_BYTES, SessionContext

MAX_HEADER_BYTES = 64 << 20
# Bumped whenever a message's layout changes: a device and an aggregator on different releases
# get a clear refusal instead of a field-level puzzle.
WIRE_VERSION = 4
MAX_NEIGHBOURS = 1 << 20
_LEN = 4


class WireError(ValueError):
    """Bytes that are not a well-formed message of the expected type."""


def _plain(value: object, blobs: list[bytes]) -> object:
    if isinstance(value, bytes):
        offset = sum(len(b) for b in blobs)
        blobs.append(value)
        return {"$b": [offset, len(value)]}
    if isinstance(value, SessionContext):
        return {"job_id": value.job_id, "round": value.round, "cohort_id": value.cohort_id}
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name), blobs) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v, blobs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, blobs) for v in value]
    return value


def _compact(message: object) -> object:
    """The per-neighbour parts of a share bundle or unmask answer as one blob each, in the order of
    a name list: no field names, references or text per neighbour on the wire."""
    if isinstance(message, ShareBundle):
        # holders are implicit: the roster's order of the sender's neighbours
        return {
            "header": message.header,
            "count": len(message.sealed),
            "sealed": b"".join(message.sealed),
            "commitments": b"".join(a + b for a, b in message.commitments),
        }
    if isinstance(message, UnmaskShares):
        return {
            "header": message.header,
            "self_dealers": list(message.self_shares),
            "self_shares": b"".join(shamir.encode(s) for s in message.self_shares.values()),
            "masking_dealers": list(message.masking_shares),
            "masking_shares": b"".join(shamir.encode(s) for s in message.masking_shares.values()),
        }
    return message


def encode_message(message: object) -> bytes:
    blobs: list[bytes] = []
    body = _plain(_compact(message), blobs)
    header = {"v": WIRE_VERSION, "type": type(message).__name__, "body": body}
    header = json.dumps(header, separators=(",", ":")).encode()
    return len(header).to_bytes(_LEN, "big") + header + b"".join(blobs)


class _Blob:
    """The binary part of one message, read field by field in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.next = 0

    def take(self, ref: object, where: str, size: int | None) -> bytes:
        if not (isinstance(ref, dict) and set(ref) == {"$b"} and isinstance(ref["$b"], list) and len(ref["$b"]) == 2):
            raise WireError(f"{where}: expected a bytes reference")
        offset, length = ref["$b"]
        if (
            isinstance(offset, bool)
            or isinstance(length, bool)
            or not isinstance(offset, int)
            or not isinstance(length, int)
        ):
            raise WireError(f"{where}: bad bytes reference")
        if offset != self.next or length < 0 or offset + length > len(self.data):
            raise WireError(
                f"{where}: bytes reference {offset}+{length} does not follow the blob ({len(self.data)} bytes)"
            )
        if size is not None and length != size:
            raise WireError(f"{where}: expected {size} bytes, got {length}")
        self.next = offset + length
        return self.data[offset : offset + length]


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


_BLOB: ContextVar[_Blob] = ContextVar("blob")


def _bytes(value: object, where: str, size: int | None = None) -> bytes:
    return _BLOB.get().take(value, where, size)


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


def _bounded_bytes(value: object, where: str, most: int) -> bytes:
    raw = _bytes(value, where)
    if len(raw) > most:
        raise WireError(f"{where}: {len(raw)} bytes, at most {most}")
    return raw


def _signature(value: object, where: str) -> bytes:
    return _bounded_bytes(value, where, MAX_SIGNATURE_BYTES)


def _advert(body: object, where: str = "KeyAdvert") -> KeyAdvert:
    return KeyAdvert(
        _header(_field(body, "header", where), f"{where}.header"),
        _bytes(_field(body, "transport_public", where), f"{where}.transport_public", 32),
        _bytes(_field(body, "masking_public", where), f"{where}.masking_public", 32),
        _bytes(_field(body, "seed_commitment", where), f"{where}.seed_commitment", 32),
        _bounded_bytes(_field(body, "certificate", where), f"{where}.certificate", MAX_CERTIFICATE_BYTES),
        _signature(_field(body, "signature", where), f"{where}.signature"),
    )


def _roster(body: object, where: str = "Roster") -> Roster:
    return Roster(
        _context(_field(body, "context", where), f"{where}.context"),
        _mapping(_field(body, "adverts", where), f"{where}.adverts", _advert),
        _mapping(_field(body, "neighbours", where), f"{where}.neighbours", _names),
    )


def _bundle(body: object, where: str = "ShareBundle") -> ShareBundle:
    header = _header(_field(body, "header", where), f"{where}.header")
    count = _int(_field(body, "count", where), f"{where}.count")
    if not 0 <= count <= MAX_NEIGHBOURS:
        raise WireError(f"{where}.count: {count} holders, expected 0 to {MAX_NEIGHBOURS}")
    size, step = SEALED_SHARES_BYTES, 2 * SHARE_COMMITMENT_BYTES
    sealed = _bytes(_field(body, "sealed", where), f"{where}.sealed", size * count)
    commitments = _bytes(_field(body, "commitments", where), f"{where}.commitments", step * count)
    return ShareBundle(
        header,
        tuple(sealed[i * size : (i + 1) * size] for i in range(count)),
        tuple(
            (
                commitments[i * step : i * step + SHARE_COMMITMENT_BYTES],
                commitments[i * step + SHARE_COMMITMENT_BYTES : (i + 1) * step],
            )
            for i in range(count)
        ),
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
        _mapping(_field(body, "signatures", where), f"{where}.signatures", _signature),
    )


def _consistency(body: object, where: str = "ConsistencySignature") -> ConsistencySignature:
    return ConsistencySignature(
        _header(_field(body, "header", where), f"{where}.header"),
        _signature(_field(body, "signature", where), f"{where}.signature"),
    )


def _shares(body: object, names_key: str, blob_key: str, where: str) -> dict[str, tuple[int, int]]:
    dealers = _names(_field(body, names_key, where), f"{where}.{names_key}")
    size = 4 + shamir.SHARE_BYTES
    raw = _bytes(_field(body, blob_key, where), f"{where}.{blob_key}", size * len(dealers))
    if len(set(dealers)) != len(dealers):
        raise WireError(f"{where}.{names_key}: repeated")
    try:
        return {d: shamir.decode(raw[i * size : (i + 1) * size]) for i, d in enumerate(dealers)}
    except shamir.ShamirError as err:
        raise WireError(f"{where}.{blob_key}: {err}") from err


def _unmask(body: object, where: str = "UnmaskShares") -> UnmaskShares:
    return UnmaskShares(
        _header(_field(body, "header", where), f"{where}.header"),
        _shares(body, "self_dealers", "self_shares", where),
        _shares(body, "masking_dealers", "masking_shares", where),
    )


def _masked(body: object, where: str = "MaskedInput") -> MaskedInput:
    return MaskedInput(
        _header(_field(body, "header", where), f"{where}.header"),
        _int(_field(body, "ring_bits", where), f"{where}.ring_bits"),
        _int(_field(body, "length", where), f"{where}.length"),
        _bytes(_field(body, "payload", where), f"{where}.payload"),
        _names(_field(body, "unreadable_shares", where), f"{where}.unreadable_shares"),
    )


def _routed(body: object, where: str = "Routing") -> dict[str, SharesFor]:
    return _mapping(body, where, _shares_for)


READERS: dict[type, Callable] = {
    KeyAdvert: _advert,
    Roster: _roster,
    ShareBundle: _bundle,
    SharesFor: _shares_for,
    UnmaskRequest: _request,
    ConsistencySignature: _consistency,
    UnmaskShares: _unmask,
}


def decode_message(raw: bytes, expected: type) -> object:
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
    if isinstance(message, dict) and message.get("v") != WIRE_VERSION:
        raise WireError(f"secure-aggregation wire version {message.get('v')!r}, this side speaks {WIRE_VERSION}")
    if not isinstance(message, dict) or message.get("type") != expected.__name__:
        got = message.get("type") if isinstance(message, dict) else type(message).__name__
        raise WireError(f"expected a {expected.__name__} message, got {got!r}")
    body = message.get("body")
    blob = _Blob(raw[_LEN + size :])
    token = _BLOB.set(blob)
    try:
        if expected is dict:
            decoded = _routed(body)
        elif expected is MaskedInput:
            decoded = _masked(body)
        elif expected in READERS:
            decoded = READERS[expected](body)
        else:
            raise WireError(f"no reader for {expected.__name__}")
    finally:
        _BLOB.reset(token)
    if blob.next != len(blob.data):
        raise WireError(f"{expected.__name__}: {len(blob.data) - blob.next} bytes after the last field")
    return decoded
