"""Build, export or submit the hierarchical job: cluster (FLARE server) -> cluster-tier clients ->
leaves -> devices through FLARE's edge API.

python jobs/nested_fleet/job.py --refresh                  # rewrite this folder's meta.json and app/
python jobs/nested_fleet/job.py --startup-kit KIT          # submit to a deployment (Flare API, ProdEnv)
python jobs/nested_fleet/job.py --mode sync --startup-kit KIT
python jobs/nested_fleet/job.py --print-device-config      # the config, data and privacy devices need
python jobs/nested_fleet/job.py --export --export-dir D    # export to D/nested_fleet

It runs only on a provisioned hierarchy (``fleetnest provision``): SimEnv cannot model one. The
committed folder: asynchronous (FedBuff-style) mode, versions from the sums of 2 leaves (or what
came within 30 s), 3 accepted versions; each leaf sums cohorts of 3 devices (at least 2) with
secure aggregation over a 12-bit ring; clip 8, noise multiplier 0.05 on the sum of the smallest
cohort a leaf releases (2 devices: each device's noise share is sized for it). The
archive is ``fleetnest_archive/`` in the server's workspace: submitting the job again, or
restarting the server, resumes from its current version.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

# NVFlare's recipe module takes --export / --export-dir out of sys.argv when it is imported
_export = argparse.ArgumentParser(add_help=False)
_export.add_argument("--export", action="store_true")
_export.add_argument("--export-dir", default="fl_job")
EXPORT = _export.parse_known_args()[0]

from nvflare.recipe.prod_env import ProdEnv  # noqa: E402
from nvflare.recipe.spec import Recipe  # noqa: E402

from app_custom.flare.fleet_messages import MODES  # noqa: E402
from app_custom.flare.job_builder import build_fleet_job  # noqa: E402
from simulator.job_script import FLEET_FN, refresh_job_folder  # noqa: E402
from simulator.methods import method_config  # noqa: E402

JOB_DIR = Path(__file__).resolve().parent


def min_devices(args: argparse.Namespace) -> int:
    return min(2, args.cohort)


def settings(args: argparse.Namespace) -> dict:
    data = {"fn": FLEET_FN, "kwargs": {"dataset": "digits", "regime": "label_skew", "num_devices": args.devices}}
    privacy = {
        "dp": {
            "clip_norm": 8.0,
            "noise_multiplier": args.noise,
            "delta": 1e-5,
            "fleet_size": args.devices,
            "cohort_size": args.cohort,
            "min_cohort": min_devices(args),  # noise shares sized for the smallest sum a leaf releases
            "mode": "distributed",
        },
        "secure_aggregation": True,
        "ring_bits": 12,
    }
    return {"config": method_config("nested", 0), "data": data, "privacy": privacy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="async")
    parser.add_argument("--devices", type=int, default=8, help="devices in the fleet's data")
    parser.add_argument("--cohort", type=int, default=3, help="devices per leaf session")
    parser.add_argument("--noise", type=float, default=0.05, help="noise multiplier on a cohort's sum")
    parser.add_argument("--versions", type=int, default=3, help="accepted versions to make")
    parser.add_argument("--max-rounds", type=int, default=10, help="rounds (sync) or candidates (async) at most")
    parser.add_argument("--buffer", type=int, default=2, help="leaf sums per version")
    parser.add_argument("--buffer-timeout", type=float, default=30.0, help="seconds a partial buffer waits")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds without a leaf sum before ending")
    parser.add_argument("--stage-timeout", type=float, default=20.0, help="seconds a leaf waits per stage")
    parser.add_argument("--refresh", action="store_true", help=f"rewrite {JOB_DIR}'s meta.json and app/")
    parser.add_argument("--print-device-config", action="store_true")
    parser.add_argument("--startup-kit", help="an admin startup kit: submit to that deployment")
    parser.add_argument("--username", default="admin@nvidia.com", help="the admin user of --startup-kit")
    args = parser.parse_args(argv)
    common = settings(args)
    if args.print_device_config:
        print(json.dumps(common, indent=2))
        return 0
    job = build_fleet_job(
        name=JOB_DIR.name,
        **common,
        assessor={
            "mode": args.mode,
            "num_versions": args.versions,
            "max_rounds": args.max_rounds,
            "buffer_size": args.buffer,
            "buffer_timeout": args.buffer_timeout,
            "max_wait": args.max_wait,
        },
        leaf={"cohort_size": args.cohort, "min_devices": min_devices(args), "stage_timeout": args.stage_timeout},
    )
    if args.refresh:
        refresh_job_folder(job, JOB_DIR)
        print(f"wrote {JOB_DIR / 'meta.json'} and {JOB_DIR / 'app'}")
        return 0
    if EXPORT.export:
        job.export_job(EXPORT.export_dir)
        print(f"exported to {Path(EXPORT.export_dir) / JOB_DIR.name}")
        return 0
    if not args.startup_kit:
        parser.error("the hierarchy runs only on a provisioned deployment: give --startup-kit (or --refresh)")
    run = Recipe(job).execute(ProdEnv(startup_kit_location=args.startup_kit, username=args.username))
    print(f"submitted job {run.get_job_id()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
