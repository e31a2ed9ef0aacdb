"""Build, export or run the flat nested job.

python jobs/nested_fedavg/job.py                          # run it in FLARE's simulator (SimEnv)
python jobs/nested_fedavg/job.py --refresh                # rewrite this folder's meta.json and app/
python jobs/nested_fedavg/job.py --export --export-dir D  # NVFlare's flags: export to D/nested_fedavg
python jobs/nested_fedavg/job.py --startup-kit KIT        # submit to a deployment (Flare API, ProdEnv)
nvflare simulator jobs/nested_fedavg -w /tmp/ws -n 8 -t 2 # run the exported folder
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from simulator.job_script import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(None, Path(__file__).resolve().parent, __doc__))
