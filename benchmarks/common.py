"""What every benchmark script shares: ``--out`` and ``--quick``, and where results go.

A full run writes the committed figures (``benchmarks/results/<name>.json``, its plots beside it)
unless ``--out`` names another file. A ``--quick`` run (a smoke run: small and short) writes
``build/bench-quick/<name>.json`` unless ``--out`` says otherwise: it never replaces the committed
figures. Results are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app_custom.durable import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = Path(__file__).resolve().parents[1] / "build" / "bench-quick"


def add_output_arguments(parser: argparse.ArgumentParser, name: str, quick: str) -> None:
    """``--quick`` (what it shrinks: ``quick``) and ``--out`` on ``parser``, for results ``name``."""
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}")
    parser.add_argument(
        "--out",
        default=None,
        help=f"the results JSON, plots beside it (default: {RESULTS.name}/{name}.json; with --quick "
        f"build/bench-quick/{name}.json, never the committed figures)",
    )


def output_path(args: argparse.Namespace, name: str) -> Path:
    """Where this run's results go: ``--out``, else the committed file, else (``--quick``) the smoke folder."""
    if args.out:
        return Path(args.out)
    return (QUICK if args.quick else RESULTS) / f"{name}.json"


def write_results(path: Path, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, atomically (a cut-short run leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)
    print(f"wrote {path}", file=sys.stderr)
