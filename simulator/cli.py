"""The ``fleetnest`` command line, assembled from the verbs each tier owns: ``provision``
(``provisioning.cli``), ``edge`` (``edge_runtime.daemon``), ``ota`` (``ota.cli``), and the
simulation's own ``simulate`` and ``edge-demo`` (here and ``simulator.edge_demo``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_runtime.daemon import add_edge_parser
from ota.cli import add_ota_parser
from provisioning.cli import add_provision_parser

from .edge_demo import add_edge_demo_parser
from .fleets import REGIMES
from .methods import ENGINES, METHODS
from .privacy_options import add_privacy_arguments, privacy_of


def _simulate(args: argparse.Namespace) -> int:
    from .runner import Experiment, run_experiment

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"fleetnest simulate: unknown method(s) {unknown}; known: {list(METHODS)}", file=sys.stderr)
        return 2
    try:
        privacy = privacy_of(args, args.devices, args.rounds)
        if privacy is not None:
            from app_custom.privacy.private_update import PrivacySettings

            PrivacySettings.from_dict(privacy)  # a bad combination fails here, not in every FLARE client
    except ValueError as e:
        print(f"fleetnest simulate: {e}", file=sys.stderr)
        return 2
    experiment = Experiment(
        dataset=args.dataset,
        regime=args.regime,
        devices=args.devices,
        rounds=args.rounds,
        seed=args.seed,
        methods=methods,
        privacy=privacy,
        engine=args.engine,
        unscaled=args.unscaled,
    )
    if args.unscaled and experiment.is_plugin:
        print(
            "fleetnest simulate: --unscaled is for shipped data sets (a plug-in delivers its own units)",
            file=sys.stderr,
        )
        return 2
    try:
        run_experiment(experiment, Path(args.out))
    except (ValueError, RuntimeError) as e:
        print(f"fleetnest simulate: {e}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    """The installed distribution's version (a checkout run without installing says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetnest")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetnest", description="Nested federated learning for robot fleets.")
    parser.add_argument("--version", action="version", version=f"fleetnest {_version()}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    simulate = verbs.add_parser(
        "simulate",
        help="run the nested method and the baselines through FLARE's simulator",
        description="Runs the nested method and its baselines (local-only, FedAvg, FedAvg + fine-tuning, "
        "FedRep, Ditto) on one simulated fleet and writes DIR/report.json (with what each device serves "
        "and why) and PNG plots.",
    )
    simulate.add_argument(
        "--dataset",
        default="digits",
        help="shipped data set (digits, basic_motions, watch, spoken_digits, segments, robot) or a plug-in "
        "'package.module:function' returning one dict per device with x_train, y_train, x_test, y_test",
    )
    simulate.add_argument(
        "--engine",
        default="flare",
        choices=ENGINES,
        help="flare: every method a FLARE SimEnv job (default); inprocess: the same learners and cluster "
        "code in one process, faster, no DP or secure aggregation",
    )
    simulate.add_argument("--unscaled", action="store_true", help="shipped data in the units its package delivers")
    simulate.add_argument("--regime", default="label_skew", choices=REGIMES, help="non-IID regime (shipped data)")
    simulate.add_argument("--devices", type=int, default=8, help="devices (shipped data; a plug-in decides itself)")
    simulate.add_argument("--rounds", type=int, default=10, help="federated rounds")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the fleet's partition and of training")
    simulate.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(METHODS)}")
    simulate.add_argument("--out", required=True, help="output folder for report.json, plots and FLARE workspaces")
    add_privacy_arguments(simulate)
    simulate.set_defaults(run=_simulate)

    add_provision_parser(verbs)
    add_edge_parser(verbs)
    add_edge_demo_parser(verbs)

    add_ota_parser(verbs)
    for _, each in parsers(parser):  # every option's help shows its default
        each.formatter_class = _HelpFormatter
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, except where there is none to show (None, False)
    or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parsers(parser: argparse.ArgumentParser, path: str = "fleetnest"):
    """(command line, parser) for ``parser`` and every sub-command below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


# What a verb may need that a device install (``pip install '.[device]'``) lacks: the extra that has it.
EXTRA_OF = {
    "nvflare": "cluster",
    "amqtt": "simulation",
    "matplotlib": "simulation",
    "sklearn": "simulation",
    "pyts": "simulation",
    "seglearn": "simulation",
    "river": "simulation",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", 1) < 1 or getattr(args, "rounds", 1) < 1:
        print("fleetnest: --devices and --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ModuleNotFoundError as err:
        extra = EXTRA_OF.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"fleetnest {args.verb}: this install lacks {err.name} (a device install holds only what a device "
            f"needs); install the {extra} extra: pip install 'fleetnest[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
