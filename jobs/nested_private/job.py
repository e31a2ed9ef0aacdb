"""Build, export or run the flat nested job with DP-noised, securely aggregated slow deltas.

python jobs/nested_private/job.py                            # run it in FLARE's simulator (SimEnv)
python jobs/nested_private/job.py --dp-epsilon 8 --fleet-size 1000  # noise for a target epsilon
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
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from simulator.job_script import job_main  # noqa: E402
from simulator.privacy_options import add_privacy_arguments, privacy_of  # noqa: E402

if __name__ == "__main__":
    sys.exit(
        job_main(
            None,
            Path(__file__).resolve().parent,
            __doc__,
            add_privacy_arguments,
            lambda args: privacy_of(args, args.devices, args.rounds, always=True, default_noise=0.05),
        )
    )
