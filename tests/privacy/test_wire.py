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
    hop = lambda message, kind: wire.decode_message(wire.encode_message(message), kind)  # noqa: E731
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
        (lambda h: h.update(v=1), "wire version 1, this side speaks 4"),
        (lambda h: h["body"].pop("masking_public"), "missing field 'masking_public'"),
        (lambda h: h["body"].update(masking_public={"$b": [32, 3]}), "expected 32 bytes, got 3"),
        (lambda h: h["body"].update(masking_public={"$b": [0, 32]}), "does not follow the blob"),
        (lambda h: h["body"]["header"]["context"].update(round=-1), "round must be a non-negative integer"),
        (lambda h: h["body"]["header"].update(sender=7), "expected a non-empty string"),
    ],
)
def test_malformed_messages_are_refused_with_the_field_named(edit, message):
    raw = wire.encode_message(make_round(2).devices["site-1"].advertise())
    with pytest.raises(wire.WireError, match=message):
        wire.decode_message(_tamper(raw, edit), KeyAdvert)


def test_truncated_or_padded_bytes_are_refused():
    r = make_round(2)
    raw = wire.encode_message(r.devices["site-1"].advertise())
    for bad in (raw[:10], raw + b"x", b"\xff\xff\xff\xff{}", "text"):
        with pytest.raises(wire.WireError):
            wire.decode_message(bad, KeyAdvert)


def test_a_device_whose_process_restarts_between_stages_resumes_its_session_from_disk(tmp_path):
    from app_custom.privacy import session_store
    from app_custom.privacy.secagg import SecAggDevice

    r = make_round(4, seed=11)
    spec = {"round": 3}
    paths = {d: tmp_path / f"{d}.json" for d in r.devices}

    def restarted(d: str) -> SecAggDevice:
        _, device, _ = session_store.load_session(paths[d], lambda s, length: r.params)
        return device

    for d, dev in r.devices.items():
        r.aggregator.add_advert(d, dev.advertise())
        session_store.save_session(paths[d], spec, dev, r.levels[d])
    roster = r.aggregator.roster()
    for d in r.devices:
        device = restarted(d)
        r.aggregator.add_shares(d, device.share_keys(roster))
        session_store.save_session(paths[d], spec, device, r.levels[d])
    routed = r.aggregator.route_shares()
    for d in r.devices:
        _, device, levels = session_store.load_session(paths[d], lambda s, length: r.params)
        assert np.array_equal(levels, r.levels[d])
        r.aggregator.add_masked(d, device.masked_input(routed[d], levels))
        session_store.save_session(paths[d], spec, device, None)
    assert oct(paths["site-1"].stat().st_mode & 0o777) == "0o600"
    request = r.aggregator.unmask_request()
    for d in request.survivors:
        r.aggregator.add_unmask(d, restarted(d).unmask(request))
    assert np.array_equal(r.aggregator.result().total, plain_sum(r, r.devices))


def test_a_share_bundle_whose_blob_does_not_match_its_holders_is_refused():
    r = make_round(4)
    for d, dev in r.devices.items():
        r.aggregator.add_advert(d, dev.advertise())
    raw = wire.encode_message(r.devices["site-1"].share_keys(r.aggregator.roster()))
    with pytest.raises(wire.WireError, match="sealed: expected 124 bytes, got 186"):
        wire.decode_message(_tamper(raw, lambda h: h["body"].update(count=2)), ShareBundle)
    with pytest.raises(wire.WireError, match="count: -1 holders"):
        wire.decode_message(_tamper(raw, lambda h: h["body"].update(count=-1)), ShareBundle)


def test_a_share_bundle_for_fewer_holders_than_the_senders_neighbours_is_rejected_and_attributed():
    r = make_round(4)
    for d, dev in r.devices.items():
        r.aggregator.add_advert(d, dev.advertise())
    bundle = r.devices["site-1"].share_keys(r.aggregator.roster())
    short = ShareBundle(bundle.header, bundle.sealed[:2], bundle.commitments[:2])
    r.aggregator.add_shares("site-1", wire.decode_message(wire.encode_message(short), ShareBundle))
    assert [(x.sender, x.stage) for x in r.aggregator.rejections] == [("site-1", "share")]
    assert "its 3 neighbours" in r.aggregator.rejections[0].reason
