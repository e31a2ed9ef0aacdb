"""Personalization benchmark: ``fleetnest simulate`` on every shipped data set, regime and seed.

For each (data set, regime) the four methods run through FLARE's simulator in the same run
and seed, so they compare like for like. Writes ``benchmarks/results/personalization.json``:

    {"setup": {...},
     "results": {"digits": {"label_skew": {"methods": {m: {"mean_acc", "worst_acc", "per_device_acc",
                                                          "per_seed": [{"seed", "mean_acc", "worst_acc"}]}},
                                            "fast_params_sent", "bytes_per_update",
                                            "forgetting": {"max_drop_after_merge", "max_drop_naive_overwrite",
                                                           "after_merge": {"merges", "share_gain",
                                                                           "share_drop_over_1pt", "median",
                                                                           "p95", "max"}},
                                            "checks": {...}}}},
     "checks": {"all_pass": bool, ...}}

Accuracies are means over seeds of each seed's mean / worst per-device accuracy; forgetting is
the largest drop over all seeds. Usage: ``python benchmarks/personalization.py [--seeds 0,1,2,3,4,5]
[--datasets digits,basic_motions] [--regimes ...] [--rounds 10] [--devices 8] [--jobs 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.fleets import REGIMES  # noqa: E402
from simulator.methods import METHODS  # noqa: E402
from simulator.report import drop_distribution  # noqa: E402
from simulator.runner import Experiment, run_experiment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "personalization.json"
BASELINES = ("local", "fedavg", "fedrep")


def summarise(reports: list[dict]) -> dict:
    methods = {}
    for method in reports[0]["methods"]:
        per_seed = [
            {
                "seed": r["setup"]["seed"],
                "mean_acc": r["methods"][method]["mean_acc"],
                "worst_acc": r["methods"][method]["worst_acc"],
            }
            for r in reports
        ]
        methods[method] = {
            "mean_acc": statistics.mean(s["mean_acc"] for s in per_seed),
            "worst_acc": statistics.mean(s["worst_acc"] for s in per_seed),
            "per_device_acc": [a for r in reports for a in r["methods"][method]["per_device_acc"]],
            "per_seed": per_seed,
        }
    drops = [
        r["forgetting"]["max_drop_after_merge"] for r in reports if r["forgetting"]["max_drop_after_merge"] is not None
    ]
    naive = [
        r["forgetting"]["max_drop_naive_overwrite"]
        for r in reports
        if r["forgetting"]["max_drop_naive_overwrite"] is not None
    ]
    test_sizes = [n for r in reports for n in r["setup"]["test_samples_per_device"]]
    summary = {
        "methods": methods,
        "test_samples_per_device": {"min": min(test_sizes), "median": statistics.median(test_sizes)},
        "fast_params_sent": sum(r["fast_params_sent"] for r in reports),
        "bytes_per_update": max(r["bytes_per_update"] for r in reports),
        "forgetting": {
            "max_drop_after_merge": max(drops) if drops else None,
            "max_drop_naive_overwrite": max(naive) if naive else None,
            "after_merge": drop_distribution([d for r in reports for d in r["forgetting"]["drops_after_merge"]]),
        },
    }
    if "nested" in methods and all(b in methods for b in BASELINES):
        best = max(methods[b]["mean_acc"] for b in BASELINES)
        summary["checks"] = {
            "nested_mean_ge_best_baseline": methods["nested"]["mean_acc"] >= best,
            "nested_worst_ge_fedavg_worst": methods["nested"]["worst_acc"] >= methods["fedavg"]["worst_acc"],
            "max_drop_after_merge_le_1pt": summary["forgetting"]["max_drop_after_merge"] is not None
            and summary["forgetting"]["max_drop_after_merge"] <= 0.01,
            "no_fast_params_sent": summary["fast_params_sent"] == 0,
        }
    return summary


def _payload(args: argparse.Namespace, seeds: list[int], started: float, results: dict, missing: list[str]) -> dict:
    checks = {
        f"{d}/{r}/{name}": ok
        for d, regimes in results.items()
        for r, summary in regimes.items()
        for name, ok in summary.get("checks", {}).items()
    }
    return {
        "setup": vars(args) | {"seeds": seeds, "wall_s": round(time.time() - started, 1)},
        "results": results,
        "complete": not missing,
        "missing": missing,
        "checks": {
            "all_pass": not missing and all(checks.values()),
            "failed": sorted(k for k, ok in checks.items() if not ok),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,basic_motions")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at once (each keeps ~1 core busy)")
    parser.add_argument("--work", default="/tmp/fleetnest-bench", help="FLARE workspaces and per-run reports")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    planned = [(d, r) for d in args.datasets.split(",") for r in args.regimes.split(",")]
    runs = [(d, r, seed) for d, r in planned for seed in seeds]
    results: dict = {}
    reports: dict[tuple[str, str, int], dict] = {}
    payload = _payload(args, seeds, started, results, [f"{d}/{r}" for d, r in planned])

    def run(cell_seed: tuple[str, str, int]) -> tuple[tuple[str, str, int], dict]:
        dataset, regime, seed = cell_seed
        experiment = Experiment(dataset, regime, args.devices, args.rounds, seed, METHODS)
        return cell_seed, run_experiment(experiment, Path(args.work) / f"{dataset}-{regime}-{seed}")

    # Each experiment is FLARE processes that keep about one core busy: ``--jobs`` runs that many at once.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for key, report in pool.map(run, runs):
            reports[key] = report
            for dataset, regime in planned:
                cell = [reports.get((dataset, regime, seed)) for seed in seeds]
                if None not in cell and regime not in results.get(dataset, {}):
                    results.setdefault(dataset, {})[regime] = summarise(cell)
            # written after every cell, so a run cut short still leaves a file that says what it holds
            missing = [f"{d}/{r}" for d, r in planned if r not in results.get(d, {})]
            payload = _payload(args, seeds, started, results, missing)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload["checks"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
