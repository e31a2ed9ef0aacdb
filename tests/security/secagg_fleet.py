"""A cohort of real devices with certificates from a real device CA, for attack tests."""

from __future__ import annotations

import functools
import tempfile

import numpy as np

from app_custom.privacy.peer_certificates import CertificateAuthority, CertificateSigner
from app_custom.privacy.quantization import Ring, quantize
from app_custom.privacy.secagg import SecAggAggregator, SecAggDevice, SecAggParams, UnmaskRequest
from app_custom.privacy.secagg_crypto import SessionContext
from provisioning.identities import DeviceCA
from tests.privacy.secagg_harness import Round


@functools.lru_cache(maxsize=1)
def _fleet(n: int = 12) -> tuple[CertificateAuthority, dict[str, CertificateSigner]]:
    ca = DeviceCA.create(tempfile.mkdtemp(prefix="fleetnest-ca-"), "attack-tests")
    signers = {}
    for i in range(n):
        issued = ca.issue(f"robot-{i + 1}", valid_days=30)
        signers[issued.device_id] = CertificateSigner(issued.key_pem, issued.cert_pem)
    authority = CertificateAuthority((ca.dir / "ca.pem").read_bytes(), (ca.dir / "crl.pem").read_bytes())
    return authority, signers


def fleet_signer(device: str) -> CertificateSigner:
    return _fleet()[1][device]


def fleet_authority() -> CertificateAuthority:
    return _fleet()[0]


def authenticated_round(n: int, length: int = 16, neighbours: int | None = None, cohort=None) -> Round:
    """``cohort``: the session's cohort as the devices know it (default: the ``n`` devices; ``()``
    leaves the roster unchecked against it)."""
    rng = np.random.default_rng(0)
    ids = [f"robot-{i + 1}" for i in range(n)]
    ring = Ring(16, n, 1.0)
    cohort = tuple(sorted(ids if cohort is None else cohort))
    params = SecAggParams(
        SessionContext("job-1", 3, "leaf-a"), ring, length, neighbours, authenticated=True, cohort=cohort
    )
    levels = {d: quantize(rng.uniform(-1, 1, length), ring, rng) for d in ids}
    devices = {d: SecAggDevice(d, params, fleet_signer(d), fleet_authority()) for d in ids}
    return Round(params, devices, SecAggAggregator(params, ids, fleet_authority()), levels)


def consistent_unmask(r: Round, device: str, request: UnmaskRequest):
    """What an aggregator showing ``request`` to the survivors gets back from ``device``: every
    survivor signs it, and the device is asked to unmask with those signatures."""
    signatures = {d: r.devices[d].sign_survivors(request).signature for d in request.survivors}
    return r.devices[device].unmask(UnmaskRequest(request.context, request.survivors, request.dropped, signatures))


def over_the_wire(message: object) -> object:
    """``message`` after a trip through its bytes, as every message of a real session takes."""
    from app_custom.privacy.wire import decode_message, encode_message

    return decode_message(encode_message(message), type(message))


def run_authenticated(r: Round, dropped_after_mask: frozenset[str] = frozenset()):
    """An honest authenticated round, every message through its bytes; the aggregator's result."""
    agg = r.aggregator
    for d, dev in r.devices.items():
        agg.add_advert(d, over_the_wire(dev.advertise()))
    roster = over_the_wire(agg.roster())
    for d in roster.adverts:
        agg.add_shares(d, over_the_wire(r.devices[d].share_keys(roster)))
    routed = agg.route_shares()
    for d in routed:
        if d not in dropped_after_mask:
            agg.add_masked(d, over_the_wire(r.devices[d].masked_input(over_the_wire(routed[d]), r.levels[d])))
    shown = over_the_wire(agg.consistency_request())
    for d in shown.survivors:
        agg.add_consistency(d, over_the_wire(r.devices[d].sign_survivors(shown)))
    request = over_the_wire(agg.unmask_request())
    for d in agg.unmaskers:
        agg.add_unmask(d, over_the_wire(r.devices[d].unmask(request)))
    return agg.result()
