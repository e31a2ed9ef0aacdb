"""What every ``jobs/<name>/job.py`` does: build the job, then run it in SimEnv, export it,
rewrite its committed folder, or submit it to a deployment (Flare API, ProdEnv)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nvflare.recipe.prod_env import ProdEnv
from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import Recipe  # consumes NVFlare's own --export / --export-dir

from app_custom.flare.job_builder import build_nested_job, sorted_task_lists
from simulator.methods import METHODS, method_config

FLEET_FN = "simulator.fleets:make_fleet"


# What a committed job folder's app/custom/ holds instead of copies of the code: FLARE treats a job
# with a custom folder as bring-your-own-code and skips its class allow-list (which knows only
# nvflare.*), and the sites import fleetnest as installed on them.
CUSTOM_README = """\
# Custom code: the fleetnest installed on each site

This job's components live in the `fleetnest` project (`app_custom`, `simulator`), which every
site that runs the job has installed (`pip install -e '.[simulation]'` in a checkout for a simulation,
`fleetnest[cluster]` on a deployment's server and leaves).
FLARE takes a job with this folder as bring-your-own-code, so its class allow-list, which knows
only `nvflare.*`, lets the components load; the submitter needs the `byoc` right.

For a copy that carries its own code (for sites without fleetnest installed):
`python job.py --export --export-dir DIR`. `python job.py --refresh` rewrites this folder.
"""


def refresh_job_folder(job, job_dir: Path) -> None:
    """Export ``job``'s configuration into ``job_dir`` (FLARE's exporter replaces a whole folder, and
    this one also holds job.py); its app/custom/ says where the code comes from instead of copying it."""
    with tempfile.TemporaryDirectory(dir=job_dir.parent) as staging:
        job.export_job(staging)
        exported = Path(staging) / job.name
        for config in (exported / "app" / "config").glob("*.json"):
            config.write_text(json.dumps(sorted_task_lists(json.loads(config.read_text())), indent=4) + "\n")
        custom = exported / "app" / "custom"
        shutil.rmtree(custom, ignore_errors=True)
        custom.mkdir()
        (custom / "README.md").write_text(CUSTOM_README)
        for entry in ("meta.json", "app"):
            target = job_dir / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(exported / entry), str(target))


def job_main(
    argv: list[str] | None,
    job_dir: Path,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
    privacy_of: Callable[[argparse.Namespace], dict | None] = lambda args: None,
) -> int:
    name = job_dir.name
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="nested")
    parser.add_argument("--dataset", default="digits", help="shipped data set: digits, basic_motions or robot")
    parser.add_argument("--regime", default="label_skew", choices=["label_skew", "env_shift", "scarce"])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workspace", default="/tmp/nvflare/fleetnest")
    parser.add_argument(
        "--refresh", action="store_true", help=f"rewrite {job_dir}'s meta.json and app/ (its configuration)"
    )
    parser.add_argument("--startup-kit", help="an admin startup kit: submit to that deployment instead of simulating")
    parser.add_argument("--username", default="admin@nvidia.com", help="the admin user of --startup-kit")
    add_arguments(parser)
    args = parser.parse_args(argv)

    data = {
        "fn": FLEET_FN,
        "kwargs": {"dataset": args.dataset, "regime": args.regime, "num_devices": args.devices, "seed": args.seed},
    }
    job = build_nested_job(
        name=name,
        config=method_config(args.method, args.seed),
        data=data,
        num_rounds=args.rounds,
        min_clients=args.devices,
        privacy=privacy_of(args),
    )
    if args.refresh:
        refresh_job_folder(job, job_dir)
        print(f"wrote {job_dir / 'meta.json'} and {job_dir / 'app'}")
        return 0
    # `--export --export-dir DIR` (NVFlare's recipe flags) writes DIR/<name> instead of running
    if args.startup_kit:
        # the Flare API submits the job as built: no pyhocon rewrite of dotted keys (nvflare job submit)
        run = Recipe(job).execute(ProdEnv(startup_kit_location=args.startup_kit, username=args.username))
        print(f"submitted job {run.get_job_id()}")
        return 0
    Recipe(job).execute(SimEnv(num_clients=args.devices, num_threads=args.threads, workspace_root=args.workspace))
    print(f"done: archive under {Path(args.workspace) / name / 'server' / 'simulate_job'}")
    return 0
