"""Personalization benchmark: every method on every shipped data set, regime and seed.

For each cell (data set, regime; ``*_unscaled`` cells feed the inputs in the units the package
delivers them) every method runs on the same fleet and seed, so they compare like for like. The
default engine runs the learners and the cluster's version code in-process
(``simulator.inprocess``; ``--engine flare`` runs every method as a FLARE SimEnv job instead).
Writes ``benchmarks/results/personalization.json``:

    {"setup": {..., "tuned_on": [...], "held_out": [...], "wall_s"},
     "results": {"digits": {"label_skew": {"held_out": bool,
                                           "methods": {m: {"mean_acc", "worst_acc", "per_device_acc",
                                                           "per_seed": [...],
                                                           "per_device_choice": [...]  (nested)}},
                                           "fast_params_sent", "bytes_per_update",
                                           "test_samples_per_device": {"min", "median"},
                                           "forgetting": {"after_merge": {...}, "naive_overwrite": {...}},
                                           "checks": {...}}}},
     "forgetting": {"after_merge": {"merges", "p95", "max", ...}, "naive_overwrite": {...}},
     "checks": {"all_pass": bool, "failed": [...]}}

Accuracies are means over seeds of each seed's mean / worst per-device accuracy. Usage:
``python benchmarks/personalization.py [--seeds 0,1,2] [--datasets digits,basic_motions,...]
[--held-out ...] [--cells label_skew,env_shift,scarce,env_shift_unscaled] [--rounds 10]
[--devices 8] [--jobs 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app_custom.durable import write_bytes_atomic  # noqa: E402
from benchmarks.common import add_output_arguments, output_path  # noqa: E402
from simulator.datasets import BENCHMARK, HELD_OUT, load  # noqa: E402
from simulator.fleets import REGIMES  # noqa: E402
from simulator.methods import ENGINES, METHODS  # noqa: E402
from simulator.report import drop_distribution  # noqa: E402
from simulator.runner import Experiment, run_experiment  # noqa: E402

BASELINES = ("local", "fedavg", "fedavg_ft", "fedrep", "ditto")
TOLERANCE = 0.005  # nested's mean may trail the best other method's by at most half a point
MERGE_P95, MERGE_MAX = 0.01, 0.03  # the drop right after a merge, over all merges
MIN_TEST_SAMPLES = 200  # per device (effective): a one-point change is two samples or more


def summarise(reports: list[dict], held_out: bool) -> dict:
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
        choices = [
            {"seed": r["setup"]["seed"], "device": i} | choice
            for r in reports
            for i, choice in enumerate(r["methods"][method].get("per_device_choice", []))
            if choice
        ]
        if choices:
            methods[method]["per_device_choice"] = choices
    drops = [d for r in reports for d in r["forgetting"]["drops_after_merge"]]
    naive = [d for r in reports for d in r["methods"].get("nested", {}).get("drops_naive_overwrite", [])]
    test_sizes = [n for r in reports for n in r["setup"]["test_samples_per_device"]]
    summary = {
        "held_out": held_out,
        "methods": methods,
        "test_samples_per_device": {"min": min(test_sizes), "median": statistics.median(test_sizes)},
        "fast_params_sent": sum(r["fast_params_sent"] for r in reports),
        "bytes_per_update": max(r["bytes_per_update"] for r in reports),
        "forgetting": {
            "after_merge": drop_distribution(drops),
            "naive_overwrite": drop_distribution(naive),
            "drops_after_merge": drops,
            "drops_naive_overwrite": naive,
        },
    }
    if "nested" in methods and all(b in methods for b in BASELINES):
        best_other = max(BASELINES, key=lambda b: methods[b]["mean_acc"])
        summary["best_other"] = best_other
        summary["checks"] = {
            "nested_mean_ge_best_other_minus_half_point": methods["nested"]["mean_acc"]
            >= methods[best_other]["mean_acc"] - TOLERANCE,
            "nested_worst_ge_fedavg_worst": methods["nested"]["worst_acc"] >= methods["fedavg"]["worst_acc"],
            "no_fast_params_sent": summary["fast_params_sent"] == 0,
        }
    return summary


def overall_forgetting(results: dict) -> dict:
    """The drop right after a merge over every merge of every cell, beside the naive overwrite's."""
    cells = [cell for regimes in results.values() for cell in regimes.values()]
    drops = [d for cell in cells for d in cell["forgetting"]["drops_after_merge"]]
    naive = [d for cell in cells for d in cell["forgetting"]["drops_naive_overwrite"]]
    after = drop_distribution(drops)
    smallest = min((cell["test_samples_per_device"]["min"] for cell in cells), default=0)
    return {
        "after_merge": after,
        "naive_overwrite": drop_distribution(naive),
        "min_test_samples_per_device": smallest,
        "checks": {
            "after_merge_p95_le_1pt": after is not None and after["p95"] <= MERGE_P95,
            "after_merge_max_le_3pt": after is not None and after["max"] <= MERGE_MAX,
            "test_samples_ge_200": smallest >= MIN_TEST_SAMPLES,
        },
    }


def cell_checks(results: dict) -> dict[str, bool]:
    """Every cell's checks, named ``data set/cell/check``."""
    return {
        f"{d}/{c}/{name}": ok
        for d, cells in results.items()
        for c, summary in cells.items()
        for name, ok in summary.get("checks", {}).items()
    }


def _payload(args: argparse.Namespace, seeds: list[int], started: float, results: dict, missing: list[str]) -> dict:
    checks = cell_checks(results)
    forgetting = overall_forgetting(results)
    checks |= {f"forgetting/{name}": ok for name, ok in forgetting["checks"].items()}
    return {
        "setup": vars(args)
        | {
            "seeds": seeds,
            "methods": list(METHODS),
            "tuned_on": [d for d in args.datasets.split(",") if d not in args.held_out.split(",")],
            "held_out": [d for d in args.held_out.split(",") if d],
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
        "forgetting": forgetting,
        "complete": not missing,
        "missing": missing,
        "checks": {
            "all_pass": not missing and all(checks.values()),
            "failed": sorted(k for k, ok in checks.items() if not ok),
        },
    }


def plot_choices(results: dict, path: Path) -> None:
    """Per cell, the nested method's mean accuracy beside the best other method's, and what share of
    devices serve each kind of model at the end (what the devices decided on their held-out data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(d, c, s) for d, regimes in results.items() for c, s in regimes.items() if "best_other" in s]
    if not cells:
        return
    kinds = ["shared", "nested", "mix", "personal"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(cells) * 0.6), 7), sharex=True)
    xs = range(len(cells))
    top.bar([x - 0.2 for x in xs], [s["methods"]["nested"]["mean_acc"] for *_, s in cells], 0.4, label="nested")
    best = [s["methods"][s["best_other"]]["mean_acc"] for *_, s in cells]
    top.bar([x + 0.2 for x in xs], best, 0.4, label="best other method")
    top.set(ylabel="mean device accuracy", ylim=(0, 1))
    top.legend(fontsize=8)
    bottom_stack = [0.0] * len(cells)
    for kind in kinds:
        shares = []
        for *_, s in cells:
            choices = s["methods"]["nested"].get("per_device_choice", [])
            shares.append(sum(c["serves"] == kind for c in choices) / max(1, len(choices)))
        bottom.bar(xs, shares, 0.6, bottom=bottom_stack, label=kind)
        bottom_stack = [b + v for b, v in zip(bottom_stack, shares)]
    bottom.set(ylabel="devices serving", ylim=(0, 1))
    bottom.legend(fontsize=8, ncol=len(kinds))
    bottom.set_xticks(list(xs))
    labels = [f"{d}/{c}" + (" (held out)" if s["held_out"] else "") for d, c, s in cells]
    bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cell(args: tuple) -> tuple[tuple[str, str, int], dict]:
    """One (data set, cell, seed) experiment, every method; in a worker process."""
    dataset, cell, seed, devices, rounds, engine, work = args
    regime, unscaled = cell.removesuffix("_unscaled"), cell.endswith("_unscaled")
    experiment = Experiment(dataset, regime, devices, rounds, seed, METHODS, engine=engine, unscaled=unscaled)
    return (dataset, cell, seed), run_experiment(experiment, Path(work) / f"{dataset}-{cell}-{seed}")


def _rounded(value):
    """Floats to 4 decimals (a hundredth of a point): the per-merge lists would otherwise fill MBs."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def gather(runs, planned: list[tuple[str, str]], seeds: list[int], held_out: set[str], summarise, payload, out: Path):
    """Each ``(data set, cell, seed)`` run's report as it comes from ``runs``: a cell is summarised
    (``summarise(reports, held_out)``) once all its seeds are in, and ``payload(results, missing)``
    is written to ``out`` after every run, so a benchmark cut short still leaves a file that says
    what it holds. (results, the last payload)."""
    results: dict = {}
    reports: dict[tuple[str, str, int], dict] = {}
    written = payload(results, [f"{d}/{c}" for d, c in planned])
    for key, report in runs:
        reports[key] = report
        for dataset, cell in planned:
            done = [reports.get((dataset, cell, seed)) for seed in seeds]
            if None not in done and cell not in results.get(dataset, {}):
                results.setdefault(dataset, {})[cell] = summarise(done, dataset in held_out)
        written = payload(results, [f"{d}/{c}" for d, c in planned if c not in results.get(d, {})])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, json.dumps(_rounded(written), indent=1).encode())  # never a half-written file
    return results, written


def _devices(dataset: str, cell: str, devices: int) -> int:
    """Devices of a cell: one per person in the natural regime, else ``--devices``."""
    persons = load(dataset).persons
    return len(set(persons.tolist())) if cell.startswith("natural") and persons is not None else devices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(BENCHMARK))
    parser.add_argument("--held-out", default=",".join(HELD_OUT), help="data sets never tuned on (reported as such)")
    parser.add_argument("--cells", default="label_skew,env_shift,scarce,natural,env_shift_unscaled")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--engine", default="inprocess", choices=ENGINES)
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at once (each keeps ~1 core busy)")
    parser.add_argument("--work", default="/tmp/fleetnest-bench", help="workspaces and per-run reports")
    add_output_arguments(parser, "personalization", "digits and segments, label skew, one seed, 3 rounds, 4 devices")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.cells, args.seeds, args.rounds, args.devices = "digits,segments", "label_skew", "0", 3, 4
    args.out = str(output_path(args, "personalization"))
    seeds = [int(s) for s in args.seeds.split(",")]
    for cell in args.cells.split(","):
        if cell.removesuffix("_unscaled") not in REGIMES:
            raise SystemExit(f"unknown cell {cell!r}: a regime of {list(REGIMES)}, optionally with _unscaled")
    started = time.time()
    planned = [
        (d, c)
        for d in args.datasets.split(",")
        for c in args.cells.split(",")
        if c.removesuffix("_unscaled") != "natural" or load(d).persons is not None  # natural: one device a person
    ]
    runs = [
        (d, c, seed, _devices(d, c, args.devices), args.rounds, args.engine, args.work)
        for d, c in planned
        for seed in seeds
    ]
    # Each experiment keeps about one core busy: ``--jobs`` runs that many at once.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results, payload = gather(
            pool.map(run_cell, runs),
            planned,
            seeds,
            set(args.held_out.split(",")),
            summarise,
            lambda results, missing: _payload(args, seeds, started, results, missing),
            Path(args.out),
        )
    plot_choices(results, Path(args.out).with_name("personalization_choices.png"))
    print(json.dumps(payload["checks"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
