"""Build, export or run the flat nested job.

python jobs/nested_fedavg/job.py                          # run it in FLARE's simulator (SimEnv)
python jobs/nested_fedavg/job.py --refresh                # rewrite this folder's meta.json and app/
python jobs/nested_fedavg/job.py --export --export-dir D  # NVFlare's flags: export to D/nested_fedavg
python jobs/nested_fedavg/job.py --startup-kit KIT        # submit to a deployment (Flare API, ProdEnv)
nvflare simulator jobs/nested_fedavg -w /tmp/ws -n 8 -t 2 # run the exported folder
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from nvflare.recipe.prod_env import ProdEnv  # noqa: E402
from nvflare.recipe.sim_env import SimEnv  # noqa: E402
from nvflare.recipe.spec import Recipe  # noqa: E402  (consumes NVFlare's own --export / --export-dir)

from app_custom.flare.job_builder import build_nested_job, sorted_task_lists  # noqa: E402
from simulator.methods import METHODS, method_config  # noqa: E402

FLEET_FN = "simulator.fleets:make_fleet"
JOB_DIR = Path(__file__).resolve().parent


def refresh_job_folder(job) -> None:
    """Export next to this file: FLARE's exporter replaces a whole folder, and this one also holds job.py."""
    with tempfile.TemporaryDirectory(dir=JOB_DIR.parent) as staging:
        job.export_job(staging)
        exported = Path(staging) / job.name
        for config in (exported / "app" / "config").glob("*.json"):
            config.write_text(json.dumps(sorted_task_lists(json.loads(config.read_text())), indent=4) + "\n")
        for entry in ("meta.json", "app"):
            target = JOB_DIR / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(exported / entry), str(target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="nested")
    parser.add_argument("--dataset", default="digits", help="shipped data set: digits, basic_motions or robot")
    parser.add_argument("--regime", default="label_skew", choices=["label_skew", "env_shift", "scarce"])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workspace", default="/tmp/nvflare/fleetnest")
    parser.add_argument("--refresh", action="store_true", help=f"rewrite {JOB_DIR}'s meta.json and app/")
    parser.add_argument("--startup-kit", help="an admin startup kit: submit to that deployment instead of simulating")
    parser.add_argument("--username", default="admin@nvidia.com", help="the admin user of --startup-kit")
    args = parser.parse_args(argv)

    data = {
        "fn": FLEET_FN,
        "kwargs": {"dataset": args.dataset, "regime": args.regime, "num_devices": args.devices, "seed": args.seed},
    }
    job = build_nested_job(
        name="nested_fedavg",
        config=method_config(args.method, args.seed),
        data=data,
        num_rounds=args.rounds,
        min_clients=args.devices,
    )
    if args.refresh:
        refresh_job_folder(job)
        print(f"wrote {JOB_DIR / 'meta.json'} and {JOB_DIR / 'app'}")
        return 0
    # `--export --export-dir DIR` (NVFlare's recipe flags) writes DIR/nested_fedavg instead of running
    if args.startup_kit:
        # the Flare API submits the job as built: no pyhocon rewrite of dotted keys (nvflare job submit)
        run = Recipe(job).execute(ProdEnv(startup_kit_location=args.startup_kit, username=args.username))
        print(f"submitted job {run.get_job_id()}")
        return 0
    Recipe(job).execute(SimEnv(num_clients=args.devices, num_threads=args.threads, workspace_root=args.workspace))
    print(f"done: archive under {Path(args.workspace) / 'nested_fedavg' / 'server' / 'simulate_job'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
