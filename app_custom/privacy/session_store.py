"""A device's secure-aggregation session on disk, between the stages of one round.

FLARE may run a device's stages in different processes (the simulator swaps clients in and out;
a real device may restart), so the session's secrets, the shares it holds and its quantized
delta are written after every stage: atomically, readable by the owner only, and deleted when
the round ends. A session file of another round is never used: the aggregator's next message
names its round and the stale file is discarded.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from app_custom.durable import write_json_atomic

from .quantization import pack, unpack
from .secagg import Authority, Roster, SecAggDevice, SecAggParams, Signer
from .wire import decode_message, encode_message


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def save_session(path: Path, spec: dict, device: SecAggDevice, levels: np.ndarray | None) -> None:
    state = device.export_state()
    document = {
        "spec": spec,
        "length": device.params.length,
        "id": state["id"],
        "transport_key": _b64(state["transport_key"]),
        "masking_seed": _b64(state["masking_seed"]),
        "self_seed": _b64(state["self_seed"]),
        "roster": None if state["roster"] is None else _b64(encode_message(state["roster"])),
        "held": state["held"],
        "senders": state["senders"],
        "masked": state["masked"],
        "signed": state["signed"],
        "signature": _b64(state["signature"]),
        "unmasked": state["unmasked"],
        "levels": None if levels is None else _b64(pack(levels, device.params.ring)),
    }
    write_json_atomic(path, document, mode=0o600)  # it holds the device's secret seeds


def load_session(
    path: Path, params_of, signer: Signer | None = None, authority: Authority | None = None
) -> tuple[dict, SecAggDevice, np.ndarray | None]:
    """(spec, device, levels); ``params_of(spec, length)`` rebuilds the round's ``SecAggParams``."""
    document = json.loads(path.read_text())
    params: SecAggParams = params_of(document["spec"], document["length"])
    state = {
        "id": document["id"],
        "transport_key": base64.b64decode(document["transport_key"]),
        "masking_seed": base64.b64decode(document["masking_seed"]),
        "self_seed": base64.b64decode(document["self_seed"]),
        "roster": None if document["roster"] is None else decode_message(base64.b64decode(document["roster"]), Roster),
        "held": document["held"],
        "senders": document["senders"],
        "masked": document["masked"],
        "signed": document["signed"],
        "signature": base64.b64decode(document["signature"]),
        "unmasked": document["unmasked"],
    }
    levels = document["levels"]
    levels = None if levels is None else unpack(base64.b64decode(levels), params.ring, params.length)
    return document["spec"], SecAggDevice.restore(state, params, signer, authority), levels


def discard_session(path: Path) -> None:
    path.unlink(missing_ok=True)
