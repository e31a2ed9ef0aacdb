"""Runs secure-aggregation rounds between real devices and an aggregator, in one process."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from app_custom.privacy.quantization import Ring, decode_sum, quantize
from app_custom.privacy.secagg import ProtocolError, SecAggAggregator, SecAggDevice, SecAggParams
from app_custom.privacy.secagg_crypto import SessionContext


@dataclass
class Round:
    params: SecAggParams
    devices: dict[str, SecAggDevice]
    aggregator: SecAggAggregator
    levels: dict[str, np.ndarray]


def make_round(
    n: int,
    length: int = 16,
    bits: int = 16,
    neighbours: int | None = None,
    seed: int = 0,
    context: SessionContext | None = None,
) -> Round:
    rng = np.random.default_rng(seed)
    ids = [f"site-{i + 1}" for i in range(n)]
    ring = Ring(bits, n, 1.0)
    params = SecAggParams(context or SessionContext("job-1", 3, "leaf-a"), ring, length, neighbours=neighbours)
    levels = {d: quantize(rng.uniform(-1, 1, length), ring, rng) for d in ids}
    return Round(params, {d: SecAggDevice(d, params) for d in ids}, SecAggAggregator(params, ids), levels)


def plain_sum(r: Round, contributors) -> np.ndarray:
    total = np.zeros(r.params.length, dtype=np.uint64)
    for d in contributors:
        total = (total + r.levels[d]) % np.uint64(r.params.ring.modulus)
    return decode_sum(total, r.params.ring)


def advertise_and_share(r: Round, skip: set[str] = frozenset()):
    for d, dev in r.devices.items():
        if d not in skip:
            r.aggregator.add_advert(d, dev.advertise())
    roster = r.aggregator.roster()
    for d in roster.adverts:
        r.aggregator.add_shares(d, r.devices[d].share_keys(roster))
    return roster, r.aggregator.route_shares()


def run(r: Round, dropped_after_mask: set[str] = frozenset()):
    _, routed = advertise_and_share(r)
    for d in routed:
        if d not in dropped_after_mask:
            r.aggregator.add_masked(d, r.devices[d].masked_input(routed[d], r.levels[d]))
    request = r.aggregator.unmask_request()
    for d in request.survivors:
        with contextlib.suppress(ProtocolError):  # a device that refuses (too few survivors) answers nothing
            r.aggregator.add_unmask(d, r.devices[d].unmask(request))
    return r.aggregator.result()
