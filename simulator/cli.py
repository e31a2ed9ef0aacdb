"""The ``fleetnest`` command line: one verb per tier (``simulate``, ``ota``; more come with later issues)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fleets import REGIMES
from .methods import METHODS


def _simulate(args: argparse.Namespace) -> int:
    from .runner import Experiment, run_experiment

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"fleetnest simulate: unknown method(s) {unknown}; known: {list(METHODS)}", file=sys.stderr)
        return 2
    experiment = Experiment(
        dataset=args.dataset,
        regime=args.regime,
        devices=args.devices,
        rounds=args.rounds,
        seed=args.seed,
        methods=methods,
    )
    try:
        run_experiment(experiment, Path(args.out))
    except (ValueError, RuntimeError) as e:
        print(f"fleetnest simulate: {e}", file=sys.stderr)
        return 1
    return 0


def _ota_build(args: argparse.Namespace) -> int:
    from app_custom.cluster.archive import ArchiveError
    from ota.release import build_release

    try:
        manifest = build_release(args.archive, args.out, args.device_class, args.version, args.max_validation_ms)
    except (ArchiveError, ValueError, OSError) as e:
        print(f"fleetnest ota build: {e}", file=sys.stderr)
        return 1
    validation = manifest["validation"]
    print(
        f"built {manifest['release']} in {args.out}: global version {manifest['global_version']}, "
        f"opset {manifest['compatibility']['opset']}, {validation['engine']} p50 {validation['p50_ms']:.2f} ms"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetnest", description="Nested federated learning for robot fleets.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    simulate = verbs.add_parser(
        "simulate",
        help="run the nested method and the baselines through FLARE's simulator",
        description="Runs nested, local-only, FedAvg and FedRep-style learning on one simulated fleet "
        "and writes DIR/report.json and PNG plots.",
    )
    simulate.add_argument(
        "--dataset",
        default="digits",
        help="shipped data set (digits, basic_motions, robot) or a plug-in 'package.module:function' "
        "returning one dict per device with x_train, y_train, x_test, y_test",
    )
    simulate.add_argument("--regime", default="label_skew", choices=REGIMES, help="non-IID regime (shipped data)")
    simulate.add_argument("--devices", type=int, default=8, help="devices (shipped data; a plug-in decides itself)")
    simulate.add_argument("--rounds", type=int, default=10)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(METHODS)}")
    simulate.add_argument("--out", required=True, help="output folder for report.json, plots and FLARE workspaces")
    simulate.set_defaults(run=_simulate)

    ota = verbs.add_parser("ota", help="signed over-the-air releases of global versions").add_subparsers(
        dest="ota_verb", required=True
    )
    build = ota.add_parser(
        "build",
        help="build a device bundle from an archived global version",
        description="Builds a bundle (slow layers, one-file ONNX graph, golden data, manifest) from an "
        "accepted version in the cluster's archive, for one device class.",
    )
    build.add_argument("--archive", required=True, help="the server's global_versions folder")
    build.add_argument("--version", type=int, default=None, help="archived version (default: the current one)")
    build.add_argument("--device-class", required=True, help="target device class, e.g. jetson-orin-jp6")
    build.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    build.add_argument("--max-validation-ms", type=float, default=100.0, help="refuse a slower candidate (p99)")
    build.set_defaults(run=_ota_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", 1) < 1 or getattr(args, "rounds", 1) < 1:
        print("fleetnest: --devices and --rounds must be >= 1", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
