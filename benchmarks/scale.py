"""Scale benchmark: what each tier of the hierarchy costs on this machine, and the round time that
implies for 10 to 1,000,000 devices.

Writes ``benchmarks/results/scale.json``::

    {"leaf_devices_per_s": float,
     "projected_round_s": {"10": float, "1000": float, "100000": float, "1000000": float},
     "assumptions": {...}, "measured": {"leaf": {...}, "cluster": {...}, "bytes": {...}}, "projection": {...}}

Measured (the reference nested model's slow delta, 17,866 values; medians over ``--repeats``):

- **leaf**: one cohort through the secure-aggregation core as a leaf runs it, from the bytes the
  devices send (decoding and checking every message, routing the shares, reconstructing the
  dropped devices' masks and the survivors' self masks, decoding the sum) with 10 % dropout
  after masking. ``leaf_devices_per_s`` is the cohort over the leaf's CPU seconds. The devices'
  own protocol work is measured too (it runs on the devices, in parallel).
- **cluster**: per leaf sum, the intake (``LeafSumCombiner``: checks, outlier test, weighting);
  per version, the server optimiser step and the validation gate's scoring of the candidate.
- **bytes**: per device up and down the leaf tier (every protocol message), per leaf sum up to
  the cluster, and the global slow layers down.

Not measured: FLARE's transport (gRPC through relays, the edge API's HTTP through the routing
proxy); the projection adds it as latency per protocol stage and bandwidth per tier (stated in
``assumptions``). The projection is a model, not a run: ``fleetnest`` has not yet run a
hierarchy of more than a few devices.

Usage: ``python benchmarks/scale.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from app_custom.cluster.aggregation import SlowDeltaAggregator  # noqa: E402
from app_custom.cluster.gate import SlowLayerValidator  # noqa: E402
from app_custom.cluster.leaf_sums import LeafPolicy, LeafSum, LeafSumCombiner  # noqa: E402
from app_custom.nested.config import NestedConfig  # noqa: E402
from app_custom.nested.device_data import load_fleet  # noqa: E402
from app_custom.privacy import wire  # noqa: E402
from app_custom.privacy.private_update import PrivacySettings, prepare_update  # noqa: E402
from app_custom.privacy.secagg import (  # noqa: E402
    KeyAdvert,
    MaskedInput,
    Roster,
    SecAggAggregator,
    SecAggDevice,
    SecAggParams,
    ShareBundle,
    SharesFor,
    UnmaskRequest,
    UnmaskShares,
)
from app_custom.privacy.secagg_crypto import SessionContext  # noqa: E402
from benchmarks.common import add_output_arguments, output_path, write_results  # noqa: E402
from simulator.methods import method_config  # noqa: E402
from simulator.report import shared_shapes  # noqa: E402

FLEET_FN = "simulator.fleets:make_fleet"
FLEETS = (10, 1_000, 100_000, 1_000_000)

ASSUMPTIONS = {
    "cohort": 1000,  # devices per secure sum at a leaf (12-bit ring: at most 1,024)
    "neighbours": 64,  # SecAgg+ degree for cohorts of 1,000
    "dropout": 0.1,  # devices lost after masking, recovered from shares
    "devices_per_leaf": 2000,  # a leaf sums its devices in cohorts, one after the other, on one core
    "leaves_per_relay": 50,
    "device_train_s": 180.0,  # the product's budget for one micro-update on a Jetson (< 3 minutes)
    "device_uplink_bytes_per_s": 1e6 / 8 * 5,  # 5 Mbit/s (LTE uplink, shared)
    "leaf_downlink_bytes_per_s": 1e9 / 8,  # 1 Gbit/s at a site's leaf, shared by its devices
    "leaf_uplink_bytes_per_s": 100e6 / 8,  # 100 Mbit/s leaf -> relay -> cluster
    "stage_latency_s": 2.0,  # one protocol stage's round trip device <-> routing proxy <-> leaf
    "protocol_stages": 4,
    "cluster_cores": 1,  # the cluster takes leaf sums in on one core (conservative)
    "round_budget_s": 12 * 3600,
}


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def leaf_round(cohort: int, neighbours: int | None, dropout: float, length: int, seed: int) -> dict:
    """One cohort's secure sum as a leaf runs it, from the devices' bytes; leaf and device costs."""
    rng = np.random.default_rng(seed)
    dp = {"clip_norm": 8.0, "noise_multiplier": 0.0, "delta": 1e-5, "fleet_size": cohort, "cohort_size": cohort}
    settings = PrivacySettings.from_dict({"dp": dp, "neighbours": neighbours, "weighting": "uniform"})
    context = SessionContext("scale", seed, "leaf-0")
    ring = settings.ring(cohort, length)
    params = SecAggParams(context, ring, length, neighbours, settings.max_dropout, min_survivors=2)
    ids = [f"device-{i:05d}" for i in range(cohort)]
    devices = {d: SecAggDevice(d, params) for d in ids}
    device_s = dict.fromkeys(ids, 0.0)
    up, down = dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)
    leaf_s = 0.0

    def device(d, fn) -> bytes:
        """The device's step: decode what it got, compute, encode its answer (all on the device)."""
        start = time.perf_counter()
        raw = wire.encode_message(fn())
        device_s[d] += time.perf_counter() - start
        up[d] += len(raw)
        return raw

    def leaf(fn, *args):
        nonlocal leaf_s
        start = time.perf_counter()
        out = fn(*args)
        leaf_s += time.perf_counter() - start
        return out

    def intake(d, raw, kind, add) -> None:
        leaf(lambda: add(d, wire.decode_message(raw, kind)))

    delta = {"slow": rng.normal(0, 8.0 / math.sqrt(length), length)}
    # one quantized update serves every device: masking costs the same whatever the values
    levels, _ = prepare_update(delta, {"slow": (length,)}, settings, cohort, rng, context)
    aggregator = leaf(SecAggAggregator, params, ids)
    for d in ids:
        intake(d, device(d, devices[d].advertise), KeyAdvert, aggregator.add_advert)
    roster = leaf(lambda: wire.encode_message(aggregator.roster()))
    for d in ids:
        down[d] += len(roster)
        bundle = device(d, lambda d=d: devices[d].share_keys(wire.decode_message(roster, Roster)))
        intake(d, bundle, ShareBundle, aggregator.add_shares)
    routed = leaf(lambda: {h: wire.encode_message(s) for h, s in aggregator.route_shares().items()})
    drop = set(rng.choice(ids, size=int(round(dropout * cohort)), replace=False).tolist())
    for d in ids:
        down[d] += len(routed[d])
        if d not in drop:
            masked = device(d, lambda d=d: devices[d].masked_input(wire.decode_message(routed[d], SharesFor), levels))
            intake(d, masked, MaskedInput, aggregator.add_masked)
    request = leaf(lambda: wire.encode_message(aggregator.unmask_request()))
    survivors = [d for d in ids if d not in drop]
    for d in survivors:
        down[d] += len(request)
        answer = device(d, lambda d=d: devices[d].unmask(wire.decode_message(request, UnmaskRequest)))
        intake(d, answer, UnmaskShares, aggregator.add_unmask)
    result = leaf(aggregator.result)
    expected = cohort - len(drop)
    assert len(result.survivors) == expected and not result.rejections, result.rejections
    return {
        "cohort": cohort,
        "neighbours": neighbours,
        "dropout": dropout,
        "leaf_s": leaf_s,
        "leaf_devices_per_s": cohort / leaf_s,
        "device_protocol_s": statistics.median(device_s[d] for d in survivors),
        "device_up_bytes": statistics.median(up[d] for d in survivors),
        "device_down_bytes": statistics.median(down[d] for d in survivors),
    }


def cluster_costs(config: dict, leaves: int, repeats: int) -> dict:
    fleet = load_fleet(FLEET_FN, {"dataset": "digits", "regime": "label_skew", "num_devices": 8, "seed": 0})
    nested = NestedConfig.from_dict(config)
    shapes = shared_shapes(nested, fleet)
    probe = SlowLayerValidator(nested, fleet.cluster_validation, fleet.num_classes)
    params = dict(probe.model.named_parameters())
    current = {name: params[name].detach().numpy().copy() for name in probe.shared_names}
    rng = np.random.default_rng(0)
    sums = [
        LeafSum(
            f"leaf-{i}",
            3,
            1000,
            1000.0,
            {k: (1000 * rng.normal(0, 1e-3, s)).astype(np.float32) for k, s in shapes.items()},
        )
        for i in range(leaves)
    ]
    dp = {"clip_norm": 8.0, "noise_multiplier": 0.0, "delta": 1e-5, "fleet_size": 1024, "cohort_size": 1024}
    privacy = PrivacySettings.from_dict({"dp": dp, "ring_bits": 16, "weighting": "uniform"})
    length = privacy.update_length(shapes)
    combiner = LeafSumCombiner(LeafPolicy(privacy=privacy, length=length, max_cohort=1024, max_share=1.0), shapes)

    def intake():
        aggregator = SlowDeltaAggregator()
        out = combiner.combine(sums, 3, aggregator)
        assert len(out.accepted) == leaves, out.rejections
        return aggregator

    intake_s, aggregator = _median_time(intake, repeats)
    apply_s, candidate = _median_time(lambda: aggregator.apply(current), repeats)
    validate_s, _ = _median_time(lambda: probe.score(candidate), repeats)
    sum_bytes = sum(v.nbytes for v in sums[0].total.values()) + 256  # fp32 sum plus its header
    return {
        "leaves_in_buffer": leaves,
        "intake_s_per_leaf_sum": intake_s / leaves,
        "apply_s": apply_s,
        "validate_s": validate_s,
        "leaf_sum_bytes": sum_bytes,
        "global_slow_bytes": int(sum(v.nbytes for v in current.values())),
        "validation_samples": int(len(fleet.cluster_validation.y)),
    }


def project(devices: int, leaf: dict, cluster: dict, a: dict) -> dict:
    leaves = max(1, math.ceil(devices / a["devices_per_leaf"]))
    relays = math.ceil(leaves / a["leaves_per_relay"])
    per_leaf = min(devices, a["devices_per_leaf"])
    cohorts = math.ceil(per_leaf / a["cohort"])
    cohort = math.ceil(per_leaf / cohorts)
    # the leaf's CPU work grows with its cohorts' sizes; the measured rate holds for cohorts up to the measured one
    leaf_cpu_s = per_leaf / leaf["leaf_devices_per_s"]
    device_s = (
        a["device_train_s"] + leaf["device_protocol_s"] + leaf["device_up_bytes"] / a["device_uplink_bytes_per_s"]
    )
    leaf_net_s = per_leaf * (leaf["device_up_bytes"] + leaf["device_down_bytes"]) / a["leaf_downlink_bytes_per_s"]
    stages_s = cohorts * a["protocol_stages"] * a["stage_latency_s"]
    up_s = cluster["leaf_sum_bytes"] * cohorts / a["leaf_uplink_bytes_per_s"]
    cluster_s = leaves * cohorts * cluster["intake_s_per_leaf_sum"] / a["cluster_cores"]
    cluster_s += cluster["apply_s"] + cluster["validate_s"]
    down_s = cluster["global_slow_bytes"] * leaves / a["leaf_uplink_bytes_per_s"]  # cluster -> leaves, shared link
    total = device_s + leaf_cpu_s + leaf_net_s + stages_s + up_s + cluster_s + down_s
    return {
        "devices": devices,
        "leaves": leaves,
        "relays": relays,
        "cohorts_per_leaf": cohorts,
        "cohort": cohort,
        "device_s": device_s,
        "leaf_cpu_s": leaf_cpu_s,
        "leaf_network_s": leaf_net_s,
        "protocol_stages_s": stages_s,
        "leaf_to_cluster_s": up_s,
        "cluster_s": cluster_s,
        "cluster_to_leaves_s": down_s,
        "round_s": total,
        "fits_budget": total <= a["round_budget_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser, "scale", "a cohort of 100 and one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each measurement (medians)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = method_config("nested")
    fleet = load_fleet(FLEET_FN, {"dataset": "digits", "regime": "label_skew", "num_devices": 8, "seed": 0})
    length = sum(math.prod(s) for s in shared_shapes(NestedConfig.from_dict(config), fleet).values())
    assumptions = dict(ASSUMPTIONS)
    if args.quick:
        assumptions |= {"cohort": 100, "neighbours": 20, "devices_per_leaf": 200}
    repeats = 1 if args.quick else args.repeats
    runs = [
        leaf_round(assumptions["cohort"], assumptions["neighbours"], assumptions["dropout"], length, seed)
        for seed in range(repeats)
    ]
    leaf = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key not in ("neighbours",)}
    leaf["neighbours"] = assumptions["neighbours"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in leaf.items()}), file=sys.stderr)
    cluster = cluster_costs(config, 50, repeats)
    print(json.dumps(cluster), file=sys.stderr)
    projection = {str(n): project(n, leaf, cluster, assumptions) for n in FLEETS}
    report = {
        "leaf_devices_per_s": leaf["leaf_devices_per_s"],
        "projected_round_s": {n: p["round_s"] for n, p in projection.items()},
        "assumptions": assumptions,
        "measured": {
            "slow_delta_values": length,
            "leaf": leaf,
            "cluster": cluster,
            "bytes": {
                "device_to_leaf": leaf["device_up_bytes"],
                "leaf_to_device": leaf["device_down_bytes"],
                "leaf_to_cluster_per_sum": cluster["leaf_sum_bytes"],
                "cluster_to_leaf": cluster["global_slow_bytes"],
            },
        },
        "projection": projection,
        "setup": {
            "machine": "this machine's CPU, one core per tier; medians; the machine is shared and noisy",
            "repeats": repeats,
            "not_measured": "FLARE's transport (gRPC, relays, the edge API over HTTP): modelled by the assumptions",
            "wall_s": time.perf_counter() - started,
        },
    }
    results = output_path(args, "scale")
    write_results(results, report)
    for n, p in projection.items():
        print(
            f"{n:>9} devices: {p['leaves']} leaves, {p['relays']} relays, round {p['round_s']:.0f} s", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
