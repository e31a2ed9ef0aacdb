"""Continual benchmark: every method as each device's data arrives over the rounds and its environment changes.

For each cell (data set, scenario: ``sensor_shift`` or ``new_classes``, ``simulator.continual``) every
method runs on the same stream and seed, with the in-process engine. Writes
``benchmarks/results/continual.json`` and ``continual.png`` (accuracy over time, the change marked):

    {"setup": {..., "seeds", "held_out", "change_round", "window_rounds", "wall_s"},
     "results": {"digits": {"sensor_shift": {"held_out": bool, "window": {seed: samples},
                                             "methods": {m: {"acc_over_time": {"env1", "env2", "current"},
                                                             "backward_transfer": {"mean", "worst"},
                                                             "forward_transfer": {...}, "final_acc": {...},
                                                             ..., "final_serving": {kind: devices},
                                                             "per_seed": [...]}},
                                             "best_baseline", "checks": {...}}}},
     "checks": {"all_pass": bool, "failed": [...]}}

Every figure is the mean over seeds of each seed's mean (or worst) device. Usage:
``python benchmarks/continual.py [--datasets digits,basic_motions,spoken_digits] [--held-out spoken_digits]
[--scenarios sensor_shift,new_classes] [--seeds 0,1,2] [--rounds 16] [--window-rounds 4] [--devices 4]
[--jobs 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_arguments, output_path  # noqa: E402
from benchmarks.personalization import BASELINES, TOLERANCE, cell_checks, gather  # noqa: E402
from simulator.continual import SCENARIOS, ContinualSetup, run_continual  # noqa: E402
from simulator.datasets import HELD_OUT  # noqa: E402
from simulator.methods import METHODS  # noqa: E402

# Training recordings each device draws from the data set's pool (``make_fleet``'s
# ``records_per_device``): enough that each environment brings a few recordings a round.
RECORDS = {"digits": 400, "basic_motions": 40, "spoken_digits": 400, "segments": 400, "watch": 40}
SUMMARIES = (
    "acc_env1_before_change",
    "acc_env1_final",
    "backward_transfer",
    "forward_transfer",
    "acc_env2_final",
    "final_acc",
)


def _mean_over_seeds(values: list[dict]) -> dict[str, float]:
    return {side: statistics.mean(v[side] for v in values) for side in ("mean", "worst")}


def summarise(reports: list[dict], held_out: bool) -> dict:
    """One cell over its seeds, with nested's checks against every baseline."""
    methods = {}
    for method in reports[0]["methods"]:
        runs = [r["methods"][method] for r in reports]
        summary = {name: _mean_over_seeds([run[name] for run in runs]) for name in SUMMARIES}
        summary["acc_over_time"] = {
            env: [statistics.mean(points) for points in zip(*(run["acc_over_time"][env] for run in runs))]
            for env in runs[0]["acc_over_time"]
        }
        summary["final_serving"] = dict(Counter(kind for run in runs for kind in run["final_serving"]))
        summary["per_seed"] = [{"seed": r["setup"]["seed"]} | r["methods"][method] for r in reports]
        methods[method] = summary
    cell = {
        "held_out": held_out,
        "window": {r["setup"]["seed"]: r["setup"]["window"] for r in reports},
        "new_classes": {r["setup"]["seed"]: r["setup"]["new_classes"] for r in reports},
        "methods": methods,
    }
    if "nested" in methods and all(b in methods for b in BASELINES):
        best = max(BASELINES, key=lambda b: methods[b]["final_acc"]["mean"])
        nested = methods["nested"]
        cell["best_baseline"] = best
        cell["checks"] = {
            "nested_bwt_ge_every_baseline": all(
                nested["backward_transfer"]["mean"] >= methods[b]["backward_transfer"]["mean"] for b in BASELINES
            ),
            "nested_final_ge_best_baseline_minus_half_point": nested["final_acc"]["mean"]
            >= methods[best]["final_acc"]["mean"] - TOLERANCE,
        }
    return cell


def _payload(args: argparse.Namespace, seeds: list[int], started: float, results: dict, missing: list[str]) -> dict:
    checks = cell_checks(results)
    rounds = args.rounds
    return {
        "setup": vars(args)
        | {
            "seeds": seeds,
            "methods": list(METHODS),
            "held_out": [d for d in args.datasets.split(",") if d in args.held_out.split(",")],
            "change_round": rounds // 2 if args.change_round is None else args.change_round,
            "records_per_device": {d: RECORDS.get(d) for d in args.datasets.split(",")},
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
        "complete": not missing,
        "missing": missing,
        "checks": {
            "all_pass": not missing and all(checks.values()),
            "failed": sorted(k for k, ok in checks.items() if not ok),
        },
    }


def plot_over_time(results: dict, change: int, path: Path) -> None:
    """Per cell, each method's mean accuracy on the devices' current environment after every round (solid)
    and, from the change on, on environment 1 (dashed): what it kept of the old environment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(d, s, cell) for d, scenarios in results.items() for s, cell in scenarios.items()]
    if not cells:
        return
    columns = min(3, len(cells))
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False, sharey=True)
    for ax, (dataset, scenario, cell) in zip(axes.flat, cells):
        for i, (method, summary) in enumerate(cell["methods"].items()):
            over_time, colour = summary["acc_over_time"], f"C{i}"
            rounds = range(len(over_time["current"]))
            ax.plot(rounds, over_time["current"], color=colour, label=method, lw=2 if method == "nested" else 1)
            after = range(change, len(over_time["env1"]))
            ax.plot(after, [over_time["env1"][p] for p in after], color=colour, ls="--", lw=1)
        ax.axvline(change, color="grey", ls=":")
        held = " (held out)" if cell["held_out"] else ""
        ax.set(title=f"{dataset} / {scenario}{held}", xlabel="rounds of data", ylim=(0, 1))
    for ax in axes.flat[len(cells) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean device accuracy")
    axes.flat[0].legend(fontsize=7, title="solid: current env; dashed: env 1", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cell(args: tuple) -> tuple[tuple[str, str, int], dict]:
    """One (data set, scenario, seed), every method; in a worker process."""
    setup, work = args
    out = Path(work) / f"{setup.dataset}-{setup.scenario}-{setup.seed}"
    started = time.time()
    report = run_continual(setup, out)
    report["setup"] |= {"seed": setup.seed, "wall_s": round(time.time() - started, 1)}
    return (setup.dataset, setup.scenario, setup.seed), report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,basic_motions,spoken_digits")
    parser.add_argument("--held-out", default=",".join(HELD_OUT), help="data sets never tuned on (reported as such)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--change-round", type=int, default=None, help="the first round of environment 2 (half-way)")
    parser.add_argument("--window-rounds", type=int, default=4, help="rounds of new data the sample store holds")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each keeps ~1 core busy)")
    parser.add_argument("--work", default="/tmp/fleetnest-continual", help="the runs' version archives")
    add_output_arguments(parser, "continual", "digits, one scenario, one seed, 6 rounds (2 in the window), 2 devices")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.scenarios, args.seeds, args.devices = "digits", SCENARIOS[0], "0", 2
        args.rounds, args.window_rounds = 6, 2
    args.out = str(output_path(args, "continual"))
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets, scenarios = args.datasets.split(","), args.scenarios.split(",")
    held_out = set(args.held_out.split(","))
    setups = [
        ContinualSetup(
            dataset,
            scenario,
            args.devices,
            args.rounds,
            seed,
            records_per_device=RECORDS.get(dataset),
            change_round=args.change_round,
            window_rounds=args.window_rounds,
        )
        for dataset in datasets
        for scenario in scenarios
        for seed in seeds
    ]  # a wrong scenario or round count fails here, before any run
    started = time.time()
    planned = [(d, s) for d in datasets for s in scenarios]

    def progress(runs):
        for done, (key, report) in enumerate(runs, 1):
            wall = report["setup"]["wall_s"]
            print(
                f"[{done}/{len(setups)}] {'/'.join(map(str, key))} done in {wall:.0f} s "
                f"({time.time() - started:.0f} s so far)",
                flush=True,
            )
            yield key, report

    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results, payload = gather(
            progress(pool.map(run_cell, [(setup, args.work) for setup in setups])),
            planned,
            seeds,
            held_out,
            summarise,
            lambda results, missing: _payload(args, seeds, started, results, missing),
            Path(args.out),
        )
    plot_over_time(results, setups[0].change, Path(args.out).with_suffix(".png"))
    print(json.dumps(payload["checks"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
