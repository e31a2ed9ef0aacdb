"""Secure-aggregation messages survive the wire, and malformed bytes are refused with the field named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app_custom.privacy import wire
from app_custom.privacy.secagg import KeyAdvert, MaskedInput, Roster, ShareBundle, UnmaskRequest, UnmaskShares

from .secagg_harness import make_round, plain_sum


def test_a_whole_round_runs_over_bytes_and_gives_the_exact_sum():
    r = make_round(5, seed=9)
    agg = r.aggregator
    hop = lambda message, kind: wire.decode(wire.encode(message), kind)  # noqa: E731
    for d, dev in r.devices.items():
        agg.add_advert(d, hop(dev.advertise(), KeyAdvert))
    roster = hop(agg.roster(), Roster)
    for d in roster.adverts:
        agg.add_shares(d, hop(r.devices[d].share_keys(roster), ShareBundle))
    routed = hop(agg.route_shares(), dict)
    for d in sorted(routed)[:-1]:
        agg.add_masked(d, hop(r.devices[d].masked_input(routed[d], r.levels[d]), MaskedInput))
    request = hop(agg.unmask_request(), UnmaskRequest)
    for d in request.survivors:
        agg.add_unmask(d, hop(r.devices[d].unmask(request), UnmaskShares))
    assert np.array_equal(agg.result().total, plain_sum(r, sorted(r.devices)[:-1]))
    assert agg.rejections == []


def _tamper(raw: bytes, edit) -> bytes:
    size = int.from_bytes(raw[:4], "big")
    header = json.loads(raw[4 : 4 + size])
    edit(header)
    new = json.dumps(header).encode()
    return len(new).to_bytes(4, "big") + new + raw[4 + size :]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.update(type="Roster"), "expected a KeyAdvert message, got 'Roster'"),
        (lambda h: h["body"].pop("masking_public"), "missing field 'masking_public'"),
        (lambda h: h["body"].update(masking_public={"$b": "AAAA"}), "expected 32 bytes, got 3"),
        (lambda h: h["body"]["header"]["context"].update(round=-1), "round must be a non-negative integer"),
        (lambda h: h["body"]["header"].update(sender=7), "expected a non-empty string"),
    ],
)
def test_malformed_messages_are_refused_with_the_field_named(edit, message):
    raw = wire.encode(make_round(2).devices["site-1"].advertise())
    with pytest.raises(wire.WireError, match=message):
        wire.decode(_tamper(raw, edit), KeyAdvert)


def test_truncated_or_padded_bytes_are_refused():
    r = make_round(2)
    raw = wire.encode(r.devices["site-1"].advertise())
    for bad in (raw[:10], raw + b"x", b"\xff\xff\xff\xff{}", "text"):
        with pytest.raises(wire.WireError):
            wire.decode(bad, KeyAdvert)
