"""Build, export or run the flat nested job with DP-noised, securely aggregated slow deltas.

python jobs/nested_private/job.py                            # run it in FLARE's simulator (SimEnv)
python jobs/nested_private/job.py --dp-epsilon 8              # noise for a target epsilon (every round charged)
python jobs/nested_private/job.py --device-metrics           # simulation: devices also send accuracy (not DP)
python jobs/nested_private/job.py --refresh                  # rewrite this folder's meta.json and app/
python jobs/nested_private/job.py --export --export-dir D    # NVFlare's flags: export to D/nested_private
python jobs/nested_private/job.py --startup-kit KIT          # submit to a deployment (Flare API, ProdEnv)
nvflare simulator jobs/nested_private -w /tmp/ws -n 8 -t 2   # run the exported folder

The committed folder: 8 devices, every device in every round's cohort (sampling rate 1), clip 8,
noise multiplier 0.05 on the cohort's sum (distributed DP), delta 1e-5, 12-bit ring, complete
graph. A cohort of 8 cannot hide a device behind meaningful noise without losing the model (at
noise 0.3 the global model stayed near chance), so this epsilon is in the thousands: the job shows
the mechanism and reports what it spends. The accuracy-epsilon trade-off of a larger fleet is in
benchmarks/results/privacy.json. Secure aggregation is always on
here (the privacy options' --secure-agg is implied).

Device metrics are off (``"device_metrics": false`` in the exported privacy settings): a device
sends its privacy spending (epsilon, delta, rounds) and nothing else measured on its data.
--device-metrics turns on the accuracy and loss each device measures on its own data, for
simulations: those numbers are sent in the clear and are OUTSIDE the DP guarantee (no noise, no
accounting). They are not noised instead because a noised accuracy needs its own sensitivity
(one over the device's sample count, itself private) and its own place in the accountant's
composition; until that exists, the honest choices are off, or on and labelled unprotected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from simulator.job_script import job_main  # noqa: E402
from simulator.privacy_options import add_privacy_arguments, privacy_of  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_privacy_arguments(parser)
    parser.add_argument(
        "--device-metrics",
        action="store_true",
        help="devices also send accuracy and loss on their own data: OUTSIDE the DP guarantee (simulations only)",
    )


def privacy(args: argparse.Namespace) -> dict:
    """The devices' ``PrivacySettings`` mapping, with ``device_metrics`` stated, never left to a default."""
    settings = privacy_of(args, args.devices, args.rounds, always=True, default_noise=0.05)
    return settings | {"device_metrics": args.device_metrics}


if __name__ == "__main__":
    sys.exit(job_main(None, Path(__file__).resolve().parent, __doc__, add_arguments, privacy))
