"""Privacy benchmark: what secure aggregation costs, and what DP noise costs in accuracy.

Writes ``benchmarks/results/privacy.json``::

    {"secagg": {"cohort", "dropout", "exact", "upload_bytes_ratio_vs_fp32", "client_time_ratio_vs_plain",
                "server_unmask_s", ..., "cases": [the same fields for every cohort x dropout]},
     "quantization": {"plain_mean_acc", "secagg_mean_acc", "diff_points", ...},
     "dp": {"fleet_size", "cohort_size", "rounds", "delta", "curve": [{"epsilon", "noise_multiplier", "mean_acc"}]},
     "setup": {...}}

- ``secagg``: the protocol core (no FLARE) for cohorts of 10, 100 and 1000 devices with 0 % and
  10 % of them dropping after they sent their shares, on vectors as long as the shipped nested
  model's slow delta. ``exact``: the unmasked sum equals the plain sum of the quantized vectors.
  The protocol is the authenticated one the hierarchy runs (device certificates from a device CA
  of the benchmark's own, signed adverts, the consistency round). Upload bytes count every
  protocol message a device sends (signed key advert with its certificate, sealed shares, masked
  vector, consistency signature, unmask shares) against the fp32 delta. Client time: a device's
  local training round plus its privacy work (clip, round, noise, quantize, the protocol's
  stages), over the training round plus a plain fp32 encoding. ``server_unmask_s``: the
  aggregator's reconstruction and unmasking. The top level repeats the 1000-device, 10 % dropout
  case.
- ``quantization`` and ``dp``: the nested method in-process (the FLARE job's learner, privacy
  pipeline, secure aggregation, server optimiser and validation gate, without FLARE's transport)
  on the shipped digits data: plain against secure aggregation with quantization and no noise,
  and the accuracy at epsilon 1, 4, 8 and infinity for a stated fleet.

Usage: ``python benchmarks/privacy.py [--quick] [--parts secagg,quantization,dp]`` (sections not
named are kept from the existing file).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from app_custom.cluster.aggregation import SlowDeltaAggregator  # noqa: E402
from app_custom.cluster.gate import SlowLayerValidator, ValidationGate  # noqa: E402
from app_custom.nested.config import NestedConfig  # noqa: E402
from app_custom.nested.device_data import load_fleet  # noqa: E402
from app_custom.nested.learner import NestedLearner  # noqa: E402
from app_custom.nested.slow_delta import shapes_of  # noqa: E402
from app_custom.privacy import wire  # noqa: E402
from app_custom.privacy.discrete_gaussian import rounded_l2_bound  # noqa: E402
from app_custom.privacy.dp import noise_for_epsilon  # noqa: E402
from app_custom.privacy.peer_certificates import CertificateAuthority, CertificateSigner  # noqa: E402
from app_custom.privacy.private_update import (  # noqa: E402
    DEFAULT_RING_BITS,
    PrivacySettings,
    cohort_mean,
    prepare_update,
)
from app_custom.privacy.quantization import QuantizationError, decode_sum  # noqa: E402
from app_custom.privacy.secagg import SecAggAggregator, SecAggDevice, SecAggParams  # noqa: E402
from app_custom.privacy.secagg_crypto import SessionContext  # noqa: E402
from benchmarks.common import add_output_arguments, output_path, write_results  # noqa: E402
from provisioning.identities import DeviceCA  # noqa: E402
from simulator.methods import method_config  # noqa: E402
from simulator.report import shared_shapes  # noqa: E402

FLEET_FN = "simulator.fleets:make_fleet"
SECAGG_NEIGHBOURS = {100: 40, 1000: 64}  # SecAgg+ degree; the cohort of 10 uses the complete graph
SECAGG_RING_BITS = {10: 12, 30: 12, 100: 14, 1000: 16}  # room for the summed noise of z = 1 at 6 sigma


def secure_sum(
    levels: dict[str, np.ndarray], settings: PrivacySettings, context: SessionContext, drop: set[str] = frozenset()
) -> tuple[np.ndarray, dict]:
    """One real protocol round over ``levels`` (each device's quantized vector in ``settings.ring``);
    returns the decoded sum and the costs: per-device protocol seconds and bytes, the aggregator's."""
    ids = sorted(levels)
    length = len(next(iter(levels.values())))
    ring = settings.ring(len(ids), length)
    params = SecAggParams(
        context, ring, length, settings.neighbours, settings.max_dropout, min_survivors=2, authenticated=True
    )
    device_s = dict.fromkeys(ids, 0.0)
    sent = dict.fromkeys(ids, 0)
    aggregator_s = 0.0
    signers, ca_pem, crl_pem = device_identities(ids)

    def on_device(device: str, fn, *args):
        start = time.perf_counter()
        message = fn(*args)
        device_s[device] += time.perf_counter() - start
        sent[device] += len(wire.encode_message(message))
        return message

    # each device checks its neighbours with an authority of its own (no shared cache of verified certificates)
    devices = {d: SecAggDevice(d, params, signers[d], CertificateAuthority(ca_pem, crl_pem)) for d in ids}
    aggregator = SecAggAggregator(params, ids, CertificateAuthority(ca_pem, crl_pem))
    for d in ids:
        aggregator.add_advert(d, on_device(d, devices[d].advertise))
    t = time.perf_counter()
    roster = aggregator.roster()
    aggregator_s += time.perf_counter() - t
    for d in ids:
        aggregator.add_shares(d, on_device(d, devices[d].share_keys, roster))
    t = time.perf_counter()
    routed = aggregator.route_shares()
    aggregator_s += time.perf_counter() - t
    for d in ids:
        if d not in drop:
            aggregator.add_masked(d, on_device(d, devices[d].masked_input, routed[d], levels[d]))
    shown = aggregator.consistency_request()
    for d in shown.survivors:
        aggregator.add_consistency(d, on_device(d, devices[d].sign_survivors, shown))
    request = aggregator.unmask_request()
    for d in aggregator.unmaskers:
        aggregator.add_unmask(d, on_device(d, devices[d].unmask, request))
    t = time.perf_counter()
    result = aggregator.result()
    unmask_s = time.perf_counter() - t
    plain = np.zeros(length, dtype=np.uint64)
    for d in request.survivors:
        plain = (plain + levels[d]) % np.uint64(ring.modulus)
    survivors = list(request.survivors)
    return result.total, {
        "exact": bool(np.array_equal(result.total, decode_sum(plain, ring))),
        "survivors": survivors,
        "device_protocol_s": statistics.median(device_s[d] for d in survivors),
        "upload_bytes": statistics.median(sent[d] for d in survivors),
        "server_unmask_s": unmask_s,
        "server_total_s": aggregator_s + unmask_s,
    }


def ring_for_noise(privacy: dict, cohort: int, length: int) -> PrivacySettings:
    """The settings with the narrowest ring (12 bits at least) that holds the cohort's summed noise
    with steps fine enough that rounding adds at most 10 % to the sensitivity (the noise grows with
    it: Kairouz et al.'s advice on the scale): more noise needs more bits, so privacy costs upload."""
    for bits in range(DEFAULT_RING_BITS, 33):
        settings = PrivacySettings.from_dict(privacy | {"ring_bits": bits})
        try:
            scaled = settings.dp.clip_norm * settings.ring(cohort, length).scale
        except QuantizationError:
            continue
        if rounded_l2_bound(scaled, length) <= 1.1 * scaled:
            return settings
    raise QuantizationError(f"no ring of 32 bits or fewer holds the noise of {privacy['dp']}")


def device_identities(ids: list[str]) -> tuple[dict[str, CertificateSigner], bytes, bytes]:
    """A device CA of the benchmark's own, a certificate for every device, and the CA's files."""
    ca = DeviceCA.create(tempfile.mkdtemp(prefix="fleetnest-bench-ca-"), "privacy-benchmark")
    signers = {}
    for d in ids:
        issued = ca.issue(d, valid_days=1)
        signers[d] = CertificateSigner(issued.key_pem, issued.cert_pem)
    return signers, (ca.dir / "ca.pem").read_bytes(), (ca.dir / "crl.pem").read_bytes()


def training_round_s(config: dict) -> tuple[float, float, int]:
    """Median seconds of one device's local training round and of its plain fp32 encoding, and the
    slow delta's length (the shipped nested model on digits)."""
    fleet = load_fleet(FLEET_FN, {"dataset": "digits", "regime": "label_skew", "num_devices": 8, "seed": 0})
    learner = NestedLearner(NestedConfig.from_dict(config), fleet.devices[0], fleet.num_classes)
    learner.receive_global(learner.initial_slow(), 0)
    train, encode = [], []
    for _ in range(5):
        start = time.perf_counter()
        delta = learner.train_round().slow_delta
        train.append(time.perf_counter() - start)
        start = time.perf_counter()
        b"".join(delta[name].astype("<f4").tobytes() for name in sorted(delta))
        encode.append(time.perf_counter() - start)
    return statistics.median(train), statistics.median(encode), sum(v.size for v in delta.values())


def secagg_cases(cohorts: list[int], dropouts: list[float], length: int, train_s: float, encode_s: float) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = []
    for cohort in cohorts:
        # the noise a deployment would add (its sampling is part of the device's time), in a ring wide
        # enough for the cohort's summed noise
        dp = {"clip_norm": 4.0, "noise_multiplier": 1.0, "delta": 1e-5, "fleet_size": cohort, "cohort_size": cohort}
        settings = PrivacySettings.from_dict(
            {"dp": dp, "neighbours": SECAGG_NEIGHBOURS.get(cohort), "ring_bits": SECAGG_RING_BITS[cohort]}
        )
        for dropout in dropouts:
            ids = [f"device-{i:04d}" for i in range(cohort)]
            started = time.perf_counter()
            deltas = {d: {"slow": rng.normal(0, 4.0 / math.sqrt(length), length)} for d in ids}
            shapes = {"slow": (length,)}
            prepare_s = []
            levels = {}
            context = SessionContext("bench", cohort, f"c{dropout}")
            for d in ids:  # the device's privacy pipeline before the protocol: clip, noise, quantize
                start = time.perf_counter()
                levels[d], _ = prepare_update(deltas[d], shapes, settings, cohort, rng, context, samples=100)
                prepare_s.append(time.perf_counter() - start)
            drop = set(rng.choice(ids, size=int(round(dropout * cohort)), replace=False).tolist())
            _, cost = secure_sum(levels, settings, context, drop)
            cost["device_protocol_s"] += statistics.median(prepare_s)
            case = {
                "cohort": cohort,
                "dropout": dropout,
                "exact": cost["exact"],
                "upload_bytes_ratio_vs_fp32": cost["upload_bytes"] / (4 * length),
                "client_time_ratio_vs_plain": (train_s + cost["device_protocol_s"]) / (train_s + encode_s),
                "server_unmask_s": cost["server_unmask_s"],
                "server_total_s": cost["server_total_s"],
                "device_protocol_s": cost["device_protocol_s"],
                "upload_bytes": cost["upload_bytes"],
                # what the per-neighbour messages weigh against a larger model: the masked vector
                # scales with the slow layers, the keys and shares do not
                "protocol_overhead_bytes": cost["upload_bytes"] - (length * settings.ring_bits + 7) // 8,
                "upload_bytes_ratio_vs_fp32_at_1M_values": settings.ring_bits / 32
                + (cost["upload_bytes"] - (length * settings.ring_bits + 7) // 8) / 4e6,
                "graph": f"SecAgg+ degree {settings.neighbours}" if settings.neighbours else "complete",
                "ring_bits": settings.ring_bits,
                "wall_s": time.perf_counter() - started,
            }
            print(json.dumps({k: case[k] for k in ("cohort", "dropout", "exact", "wall_s")}), file=sys.stderr)
            cases.append(case)
    return cases


def run_fleet(
    dataset: str,
    regime: str,
    devices: int,
    cohort: int,
    rounds: int,
    seed: int,
    privacy: PrivacySettings | None,
    records: int | None = None,
    protocol: bool = True,
) -> dict:
    """The nested method in-process: the same learner, privacy pipeline, secure aggregation, server
    optimiser and gate as the FLARE job; each round a random cohort trains. Returns accuracies.
    ``records``: training recordings per device drawn from a shared pool (``make_fleet``'s
    ``records_per_device``). ``protocol`` False: the cohort's quantized vectors are summed in the
    ring directly, the sum secure aggregation reproduces exactly (every ``secagg`` case checks it),
    without its cost."""
    raw = method_config("nested", seed)
    config = NestedConfig.from_dict(raw)
    spec = {"dataset": dataset, "regime": regime, "num_devices": devices, "seed": seed}
    fleet = load_fleet(FLEET_FN, spec | ({"records_per_device": records} if records else {}))
    learners = [NestedLearner(config, d, fleet.num_classes, device_seed=i) for i, d in enumerate(fleet.devices)]
    probe = SlowLayerValidator(config, fleet.cluster_validation, fleet.num_classes)
    gate, aggregator = ValidationGate(0.05, 0.25), SlowDeltaAggregator()
    params = dict(probe.model.named_parameters())
    current = {name: params[name].detach().numpy().copy() for name in probe.shared_names}
    shapes = shapes_of(current)
    current_scores, version = None, 0
    rng = np.random.default_rng(seed)
    accepted = 0
    for round_ in range(rounds):
        chosen = sorted(rng.choice(devices, size=cohort, replace=False).tolist())
        aggregator.reset()
        updates = {}
        for i in chosen:
            learners[i].receive_global(current, version)
            delta = learners[i].train_round().slow_delta
            updates[f"device-{i:04d}"] = (delta, len(learners[i].data.train))
        if privacy is None:
            for device, (delta, samples) in updates.items():
                aggregator.add(device, delta, samples, shapes)
        else:
            context = SessionContext("bench-fleet", round_, "all")
            levels = {
                device: prepare_update(delta, shapes, privacy, cohort, rng, context, samples)[0]
                for device, (delta, samples) in updates.items()
            }
            if protocol:
                total, cost = secure_sum(levels, privacy, context)
                survivors = cost["survivors"]
            else:
                ring = privacy.ring(cohort, len(next(iter(levels.values()))))
                total = decode_sum(np.sum(list(levels.values()), axis=0) % np.uint64(ring.modulus), ring)
                survivors = sorted(levels)
            mean = cohort_mean(total, len(survivors), shapes, privacy, context)
            aggregator.add_cohort_mean(survivors, mean, shapes)
        candidate = aggregator.apply(current)
        scores = probe.score(candidate)
        if gate.assess(scores, current_scores).accepted:
            aggregator.commit()
            current, current_scores, version = candidate, scores, version + 1
            accepted += 1
    accs = []
    for learner in learners:
        accs.append(learner.receive_global(current, version).acc_after)
    return {"mean_acc": float(np.mean(accs)), "worst_acc": float(np.min(accs)), "accepted_versions": accepted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser, "privacy", "small cohorts and one seed")
    parser.add_argument(
        "--parts", default="secagg,quantization,dp", help="which sections to measure; the others are kept from the file"
    )
    args = parser.parse_args(argv)
    results = output_path(args, "privacy")
    parts = set(args.parts.split(","))
    unknown = parts - {"secagg", "quantization", "dp"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    started = time.perf_counter()
    report = json.loads(results.read_text()) if results.exists() and parts != {"secagg", "quantization", "dp"} else {}
    config = method_config("nested")
    train_s, encode_s, length = training_round_s(config)
    fleet = load_fleet(FLEET_FN, {"dataset": "digits", "regime": "label_skew", "num_devices": 8, "seed": 0})
    assert length == sum(math.prod(s) for s in shared_shapes(NestedConfig.from_dict(config), fleet).values())
    seeds = [0] if args.quick else [0, 1, 2]
    clip = 8.0

    if "secagg" in parts:
        cohorts = [10, 30] if args.quick else [10, 100, 1000]
        cases = secagg_cases(cohorts, [0.0, 0.1], length, train_s, encode_s)
        headline = max(cases, key=lambda c: (c["cohort"], c["dropout"]))
        report["secagg"] = dict(headline) | {
            "headline": "the largest cohort with 10 % dropout; every case in 'cases'",
            "train_round_s": train_s,  # the client time ratios' baseline, measured in this run
            "plain_encode_s": encode_s,
            "cases": cases,
        }

    if "quantization" in parts:
        no_noise = PrivacySettings.from_dict(
            {"dp": {"clip_norm": clip, "noise_multiplier": 0.0, "delta": 1e-5, "fleet_size": 8, "cohort_size": 8}}
        )
        plain = [run_fleet("digits", "label_skew", 8, 8, 10, s, None) for s in seeds]
        quantized = [run_fleet("digits", "label_skew", 8, 8, 10, s, no_noise) for s in seeds]
        plain_acc = float(np.mean([r["mean_acc"] for r in plain]))
        secagg_acc = float(np.mean([r["mean_acc"] for r in quantized]))
        report["quantization"] = {
            "plain_mean_acc": plain_acc,
            "secagg_mean_acc": secagg_acc,
            "diff_points": 100 * (secagg_acc - plain_acc),
            "within_1pt": abs(secagg_acc - plain_acc) <= 0.01,
            "per_seed": {"plain": [r["mean_acc"] for r in plain], "secagg": [r["mean_acc"] for r in quantized]},
            "setup": "digits label_skew, 8 devices, all in every round, 10 rounds; clip 8, no noise,"
            f" {no_noise.ring_bits}-bit ring; both weigh devices by samples (secure aggregation: {no_noise.weighting},"
            f" weight_cap {no_noise.weight_cap}); the difference includes clipping at 8",
        }

    if "dp" in parts:
        fleet_size, cohort, rounds, delta = (40, 20, 5, 1e-5) if args.quick else (200, 100, 10, 1e-5)
        records = 40  # digits has ~1,100 training recordings: 200 devices draw theirs from one pool
        curve = []
        for epsilon in (1.0, 4.0, 8.0, math.inf):
            z = noise_for_epsilon(epsilon, delta, rounds)  # charged for every round: no amplification
            dp = {"clip_norm": clip, "noise_multiplier": z, "delta": delta, "fleet_size": fleet_size}
            # every device of this fleet holds the same number of samples: uniform weights are sample
            # weights, without scaling each signal down against its noise share (weight_cap)
            settings = ring_for_noise({"dp": dp | {"cohort_size": cohort}, "weighting": "uniform"}, cohort, length)
            runs = [
                run_fleet("digits", "env_shift", fleet_size, cohort, rounds, s, settings, records, protocol=False)
                for s in seeds
            ]
            point = {
                "epsilon": None if math.isinf(epsilon) else epsilon,
                "noise_multiplier": z,
                "ring_bits": settings.ring_bits,
                "mean_acc": float(np.mean([r["mean_acc"] for r in runs])),
                "worst_acc": float(np.mean([r["worst_acc"] for r in runs])),
                "accepted_versions": float(np.mean([r["accepted_versions"] for r in runs])),
            }
            print(json.dumps(point), file=sys.stderr)
            curve.append(point)
        report["dp"] = {
            "fleet_size": fleet_size,
            "cohort_size": cohort,
            "amplification": "none (a device is charged for every round; cohorts are not sampled)",
            "rounds": rounds,
            "delta": delta,
            "clip_norm": clip,
            "mode": "distributed (secure aggregation), the narrowest ring of 12 bits or more that holds the summed"
            " noise (ring_bits per point), the cohort's rotation",
            "weighting": settings.weighting,
            "data": f"digits env_shift; each device draws {records} training recordings from a shared pool"
            " (overlapping, each through its own sensors) and is tested on the held-out pool",
            "sum": "the cohort's quantized vectors summed in the ring: what secure aggregation releases exactly"
            f" (checked in every secagg case), without running the protocol {4 * len(seeds) * rounds} times",
            "curve": curve,
        }

    report["setup"] = report.get("setup", {}) | {
        "slow_delta_values": length,
        "train_round_s": train_s,
        "plain_encode_s": encode_s,
        "seeds": seeds,
        "machine": "this machine's CPU; medians; the machine is shared and noisy",
        f"wall_s_{'_'.join(sorted(parts))}": time.perf_counter() - started,
    }
    write_results(results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
