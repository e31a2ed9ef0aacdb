"""Deterministic rings: which devices get a release first.

A layout is a salt and an ordered list of rings with cumulative shares of the fleet, by default
canary 5 %, then 10 %, 50 % and 100 %. A device's bucket is the first 8 bytes of
sha256(salt : device id) as a fraction in [0, 1); its ring is the first whose cumulative share
exceeds the bucket. The same device always lands in the same ring (for a given salt), every
device lands in exactly one, and a device never needs to know the rest of the fleet. The rollout
role signs the layout (``desired/rings.json``), so a device computes its ring from verified data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_RINGS = (("canary", 0.05), ("ring-10", 0.10), ("ring-50", 0.50), ("ring-100", 1.0))
LAYOUT = "rings"


class RingError(ValueError):
    """A ring layout is malformed (the message says how)."""


def make_layout(salt: str, rings: Sequence[tuple[str, float]] = DEFAULT_RINGS) -> dict:
    layout = {"salt": salt, "rings": [{"name": name, "share": float(share)} for name, share in rings]}
    check_layout(layout)
    return layout


def check_layout(layout: object) -> dict:
    if not isinstance(layout, dict) or not isinstance(layout.get("salt"), str) or not layout["salt"]:
        raise RingError("a ring layout needs a non-empty 'salt'")
    rings = layout.get("rings")
    if not isinstance(rings, list) or not rings:
        raise RingError("a ring layout needs a non-empty list of rings")
    previous, names = 0.0, set()
    for ring in rings:
        name, share = (ring.get("name"), ring.get("share")) if isinstance(ring, dict) else (None, None)
        if not isinstance(name, str) or not name or "/" in name or name in names or name == LAYOUT:
            raise RingError(f"bad or repeated ring name {name!r}")
        if not isinstance(share, (int, float)) or not previous < share <= 1.0:
            raise RingError(f"ring {name}: cumulative share {share!r} must rise above {previous} and be <= 1")
        names.add(name)
        previous = float(share)
    if previous != 1.0:
        raise RingError(f"the last ring must cover the whole fleet (share 1.0), got {previous}")
    return layout


def bucket(device_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def ring_of(device_id: str, layout: dict) -> str:
    if not device_id:
        raise RingError("a device id is needed to place the device in a ring")
    position = bucket(device_id, layout["salt"])
    for ring in layout["rings"]:
        if position < ring["share"]:
            return ring["name"]
    return layout["rings"][-1]["name"]
